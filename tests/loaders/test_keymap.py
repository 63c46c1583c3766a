"""Declarative key maps: real checkpoint names onto ours, fused q/k/v, and every problem named."""
import pytest
import torch

from packformer.config import EncoderConfig
from packformer.heads import ClassificationHead
from packformer.loaders.hf import hf_keymap
from packformer.loaders.keymap import CheckpointError, KeyMap, strip_prefix
from packformer.loaders.parts import param_view
from packformer.model import Encoder

CFG = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position_embeddings=20)


def _bert_layer(i):
    at = f"encoder.layer.{i}.attention."
    return {
        f"layers.{i}.qkv.weight": [at + "self.query.weight", at + "self.key.weight", at + "self.value.weight"],
        f"layers.{i}.qkv.bias": [at + "self.query.bias", at + "self.key.bias", at + "self.value.bias"],
        f"layers.{i}.out.weight": [at + "output.dense.weight"],
        f"layers.{i}.out.bias": [at + "output.dense.bias"],
        f"layers.{i}.norm1.weight": [at + "output.LayerNorm.weight"],
        f"layers.{i}.norm1.bias": [at + "output.LayerNorm.bias"],
        f"layers.{i}.ffn1.weight": [f"encoder.layer.{i}.intermediate.dense.weight"],
        f"layers.{i}.ffn1.bias": [f"encoder.layer.{i}.intermediate.dense.bias"],
        f"layers.{i}.ffn2.weight": [f"encoder.layer.{i}.output.dense.weight"],
        f"layers.{i}.ffn2.bias": [f"encoder.layer.{i}.output.dense.bias"],
        f"layers.{i}.norm2.weight": [f"encoder.layer.{i}.output.LayerNorm.weight"],
        f"layers.{i}.norm2.bias": [f"encoder.layer.{i}.output.LayerNorm.bias"],
    }


# Each packformer parameter of CFG's encoder, and the key(s) of a BERT checkpoint it is read from (written
# out by hand; several keys are concatenated along dim 0 in this order).
BERT_ENCODER = {
    "embeddings.word.weight": ["embeddings.word_embeddings.weight"],
    "embeddings.position.weight": ["embeddings.position_embeddings.weight"],
    "embeddings.token_type.weight": ["embeddings.token_type_embeddings.weight"],
    "embeddings.norm.weight": ["embeddings.LayerNorm.weight"],
    "embeddings.norm.bias": ["embeddings.LayerNorm.bias"],
    **_bert_layer(0),
    **_bert_layer(1),
}
HEADS = {
    "bert": {"head.dense.weight": ["pooler.dense.weight"], "head.dense.bias": ["pooler.dense.bias"],
             "head.out.weight": ["classifier.weight"], "head.out.bias": ["classifier.bias"]},
    "roberta": {"head.dense.weight": ["classifier.dense.weight"], "head.dense.bias": ["classifier.dense.bias"],
                "head.out.weight": ["classifier.out_proj.weight"], "head.out.bias": ["classifier.out_proj.bias"]},
}


def _model(with_head=False):
    return param_view(Encoder(CFG), ClassificationHead(16, 3) if with_head else None)


def _checkpoint(names, model):
    """A checkpoint with the given names, shaped for `model`, every tensor different (so a swap shows)."""
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ckpt = {}
    for target, sources in names.items():
        shape = shapes[target]
        for s in sources:
            ckpt[s] = torch.randn(shape[0] // len(sources), *shape[1:], generator=g)
    return ckpt


def test_bert_checkpoint_names_map_onto_ours():
    ckpt = _checkpoint(BERT_ENCODER, _model())
    out = hf_keymap("bert", with_head=False).convert(ckpt, _model(), CFG.num_layers)
    assert out.keys() == BERT_ENCODER.keys()
    for target, sources in BERT_ENCODER.items():
        assert torch.equal(out[target], torch.cat([ckpt[s] for s in sources])), target
    # q, k, v stacked in that order: the key projection is rows H..2H of the fused weight
    assert torch.equal(out["layers.1.qkv.weight"][16:32], ckpt["encoder.layer.1.attention.self.key.weight"])


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_classification_head_names_map_onto_ours(model_type):
    names = {**BERT_ENCODER, **HEADS[model_type]}
    ckpt = _checkpoint(names, _model(with_head=True))
    out = hf_keymap(model_type, with_head=True).convert(ckpt, _model(with_head=True), CFG.num_layers)
    assert out.keys() == names.keys()
    for target, (source,) in HEADS[model_type].items():
        assert torch.equal(out[target], ckpt[source]), target


def test_the_hand_written_names_are_those_of_a_transformers_bert_checkpoint():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20))
    state = hf.state_dict()
    written = {s for sources in BERT_ENCODER.values() for s in sources}
    buffers = {"embeddings.position_ids", "embeddings.token_type_ids"}      # saved by some versions
    assert set(state) - buffers == written | {"pooler.dense.weight", "pooler.dense.bias"}
    out = hf_keymap("bert", with_head=False).convert(state, _model(), CFG.num_layers)   # the pooler is unused
    assert torch.equal(out["layers.0.ffn2.weight"], state["encoder.layer.0.output.dense.weight"])


def test_invert_writes_the_checkpoint_names_back():
    km = hf_keymap("bert", with_head=False)
    ckpt = _checkpoint(BERT_ENCODER, _model())
    back = km.invert(km.convert(ckpt, _model(), CFG.num_layers), CFG.num_layers)
    assert back.keys() == ckpt.keys() and all(torch.equal(back[k], v) for k, v in ckpt.items())


def test_strip_prefix_finds_the_model_prefix():
    sd, prefix = strip_prefix({"bert.embeddings.word_embeddings.weight": 1, "classifier.weight": 2},
                              "embeddings.word_embeddings.weight")
    assert prefix == "bert." and set(sd) == {"embeddings.word_embeddings.weight", "classifier.weight"}


def test_known_unused_keys_are_ignored_but_strangers_are_not():
    km = hf_keymap("bert", with_head=False)
    ckpt = _checkpoint(BERT_ENCODER, _model())
    ckpt["pooler.dense.weight"] = torch.zeros(16, 16)        # BertModel's pooler: unused by embeddings
    ckpt["cls.predictions.bias"] = torch.zeros(50)            # a pre-training head
    km.convert(ckpt, _model(), CFG.num_layers)
    ckpt["mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unused keys \\(1\\): mystery.weight"):
        km.convert(ckpt, _model(), CFG.num_layers)


def test_a_checkpoint_without_the_token_type_table_loads():
    # RoBERTa-family checkpoints saved with type_vocab_size=1 may lack it: the model keeps its own
    ckpt = _checkpoint(BERT_ENCODER, _model())
    del ckpt["embeddings.token_type_embeddings.weight"]
    out = hf_keymap("roberta", with_head=False).convert(ckpt, _model(), CFG.num_layers)
    assert out.keys() == BERT_ENCODER.keys() - {"embeddings.token_type.weight"}


def test_a_missing_part_of_a_fused_weight_is_named():
    ckpt = _checkpoint(BERT_ENCODER, _model())
    del ckpt["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder\.layer\.1\.attention\.self\.key\.weight\n"):
        hf_keymap("bert", with_head=False).convert(ckpt, _model(), CFG.num_layers)


def test_every_problem_is_named_in_one_error():
    ckpt = _checkpoint(BERT_ENCODER, _model())
    del ckpt["encoder.layer.1.output.dense.bias"]
    del ckpt["embeddings.LayerNorm.bias"]
    ckpt["mystery.weight"] = torch.zeros(1)
    ckpt["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(31, 16)
    ckpt["encoder.layer.0.attention.self.value.bias"] = torch.zeros(15)
    with pytest.raises(CheckpointError) as e:
        hf_keymap("bert", with_head=False).convert(ckpt, _model(), CFG.num_layers, what="checkpoint x")
    assert str(e.value).splitlines() == [
        "checkpoint x does not fit the model:",
        "  missing keys (2): embeddings.LayerNorm.bias, encoder.layer.1.output.dense.bias",
        "  unused keys (1): mystery.weight",
        "  shape mismatches (2): "
        "encoder.layer.0.attention.self.query.bias + encoder.layer.0.attention.self.key.bias + "
        "encoder.layer.0.attention.self.value.bias: expected (48,), found (16,) + (16,) + (15,); "
        "encoder.layer.0.intermediate.dense.weight: expected (32, 16), found (31, 16)",
    ]


def test_a_model_parameter_no_rule_fills_is_named():
    # a checkpoint that fits every rule still fails if the model has a parameter the rules do not cover
    model = _model()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"parameters not filled \(2\): extra\.bias, extra\.weight"):
        hf_keymap("bert", with_head=False).convert(_checkpoint(BERT_ENCODER, _model()), model, CFG.num_layers)


def test_absent_targets_load_as_zeros_whatever_the_model_was_initialised_with():
    # a family that lacks one bias but keeps the others: the model's own (random) init must not survive
    model = _model()
    ckpt = _checkpoint(BERT_ENCODER, model)
    for i in range(CFG.num_layers):
        del ckpt[f"encoder.layer.{i}.intermediate.dense.bias"]
    bert = hf_keymap("bert", with_head=False)
    km = KeyMap([r for r in bert.rules if r.target != "layers.{i}.ffn1.bias"], ignore=bert.ignore,
                optional=bert.optional, absent=["layers.*.ffn1.bias"])
    assert model.state_dict()["layers.0.ffn1.bias"].abs().sum() > 0
    params = km.convert(ckpt, model, CFG.num_layers)
    for i in range(CFG.num_layers):
        assert torch.equal(params[f"layers.{i}.ffn1.bias"], torch.zeros(CFG.intermediate_size))
    assert torch.equal(params["layers.0.ffn2.bias"], ckpt["encoder.layer.0.output.dense.bias"])
