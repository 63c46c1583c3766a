"""torchtext XLM-R state dicts: both naming schemes, the RobertaClassificationHead, the tokenizer.

The reference is a random-initialised transformers XLMRobertaModel whose weights are written out under
torchtext's names (spelled out below from pytorch/text torchtext/models/roberta/{model,modules}.py).
"""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import packformer
from packformer.loaders import CheckpointError
from packformer.loaders.torchtext import detect_scheme, load_torchtext

TINY = dict(vocab_size=202, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
            max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            layer_norm_eps=1e-5, hidden_act="gelu")
NUM_CLASSES = 3
SCHEMES = ["current", "legacy", "better_transformer"]
HF_TO_TORCHTEXT = {  # HF sublayer -> (current / better_transformer name, legacy name)
    "attention.output.dense": ("self_attn.out_proj", "attention.output_projection"),
    "attention.output.LayerNorm": ("norm1", "attention_layer_norm"),
    "intermediate.dense": ("linear1", "residual_mlp.mlp.0"),
    "output.dense": ("linear2", "residual_mlp.mlp.3"),
    "output.LayerNorm": ("norm2", "final_layer_norm"),
}


def make_hf(seed: int = 0, **overrides):
    """XLMRobertaModel with every weight random (so a swapped or transposed tensor shows). The
    token-type row is zero: fairseq/torchtext have no token types (the fairseq->HF converter does the same)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    model = XLMRobertaModel(XLMRobertaConfig(**{**TINY, **overrides}), add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
        model.embeddings.token_type_embeddings.weight.zero_()
    return model


def make_head(hidden: int, seed: int = 1) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"dense": nn.Linear(hidden, hidden), "out_proj": nn.Linear(hidden, NUM_CLASSES)})


def torchtext_head(head: nn.ModuleDict, features: torch.Tensor) -> torch.Tensor:
    """torchtext RobertaClassificationHead in eval: features[:, 0] -> dense -> ReLU -> out_proj."""
    return head["out_proj"](torch.relu(head["dense"](features[:, 0, :])))


def to_torchtext(hf, scheme: str, head: nn.ModuleDict | None = None) -> dict[str, torch.Tensor]:
    """HF XLM-R weights -> a torchtext RobertaModel state dict in the given naming scheme."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    t = "encoder.transformer."
    out = {t + "token_embedding.weight": sd["embeddings.word_embeddings.weight"],
           t + "positional_embedding.embedding.weight": sd["embeddings.position_embeddings.weight"],
           t + "embedding_layer_norm.weight": sd["embeddings.LayerNorm.weight"],
           t + "embedding_layer_norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(hf.config.num_hidden_layers):
        h = f"encoder.layer.{i}."
        layer = {"current": f"{t}layers.layers.{i}.", "legacy": f"{t}layers.{i}.",
                 "better_transformer": f"{t}layers.{i}.better_transformer."}[scheme]
        for w in ("weight", "bias"):
            qkv = f"attention.input_projection.{w}" if scheme == "legacy" else f"self_attn.in_proj_{w}"
            out[layer + qkv] = torch.cat([sd[f"{h}attention.self.{p}.{w}"] for p in ("query", "key", "value")])
            for ours, names in HF_TO_TORCHTEXT.items():
                out[f"{layer}{names[scheme == 'legacy']}.{w}"] = sd[f"{h}{ours}.{w}"]
    if head is not None:
        out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return out


def save(tmp_path, state, name="model.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def random_ids(n: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """<s> content </s> with content ids in [4, vocab): never the pad id 1."""
    rnd = random.Random(seed)
    lengths = [1, max_len - 2] + [rnd.randint(0, max_len - 2) for _ in range(n - 2)]
    return [[0] + [rnd.randrange(4, vocab) for _ in range(k)] + [2] for k in lengths]


def padded(ids: list[list[int]]) -> torch.Tensor:
    """torchtext.functional.to_tensor(ids, padding_value=1)."""
    return nn.utils.rnn.pad_sequence([torch.tensor(s) for s in ids], batch_first=True, padding_value=1)


@torch.no_grad()
def hf_hidden(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state


@pytest.fixture(scope="module")
def hf():
    return make_hf()


@pytest.fixture(scope="module")
def head():
    return make_head(TINY["hidden_size"])


@pytest.fixture(scope="module")
def ids():
    return random_ids(6, TINY["max_position_embeddings"] - 2, TINY["vocab_size"])


# ---- parity with transformers ------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_hidden_states_equal_xlmr(tmp_path, hf, ids, scheme):
    state = to_torchtext(hf, scheme)
    assert detect_scheme(state, "encoder.") == (scheme, 2)
    model = packformer.load(save(tmp_path, state), num_heads=4)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size,
            c.max_position_embeddings, c.position_offset, c.pad_token_id, c.type_vocab_size,
            c.layer_norm_eps, c.activation) == (202, 48, 2, 4, 80, 40, 2, 1, 0, 1e-5, "gelu")
    assert model.format == "torchtext" and model.head is None and model.tokenizer is None
    assert model.max_seq_length == 38          # no preset: the whole position table (40 - offset 2)

    ref = hf_hidden(hf, padded(ids))                                                   # [B, L, H]
    hidden = model.hidden_states(model.pack_ids(ids))                                  # [T, H]
    for b, seq in enumerate(torch.split(hidden, [len(s) for s in ids])):
        torch.testing.assert_close(seq, ref[b, : len(ids[b])], atol=1e-4, rtol=0)
    # a sequence's result does not depend on its batch
    alone = model.hidden_states(model.pack_ids(ids[2:3]))
    torch.testing.assert_close(alone, ref[2, : len(ids[2])], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_equal_torchtext_head(tmp_path, hf, head, ids, scheme):
    model = packformer.load(save(tmp_path, to_torchtext(hf, scheme, head)), num_heads=4)
    assert model.num_labels == NUM_CLASSES and model.head.act == "relu"
    with torch.no_grad():
        ref = torchtext_head(head, hf_hidden(hf, padded(ids)))                         # [B, C]
    torch.testing.assert_close(model.classify_batch(model.pack_ids(ids)), ref, atol=1e-4, rtol=0)


def test_tutorial_drop_in_padded_ids(tmp_path, hf, head, ids):
    """model(to_tensor(transform(texts), padding_value=1)) gives what the packed path gives."""
    x = padded(ids)
    encoder = packformer.load(save(tmp_path, to_torchtext(hf, "current"), "enc.pt"), num_heads=4)
    out = encoder(x)                                                                   # [B, L, H]
    ref = hf_hidden(hf, x)
    mask = (x != 1).unsqueeze(-1)
    torch.testing.assert_close(out, ref * mask, atol=1e-4, rtol=0)
    assert torch.equal(out[~mask.squeeze(-1)], torch.zeros_like(out[~mask.squeeze(-1)]))

    classifier = packformer.load(save(tmp_path, to_torchtext(hf, "legacy", head), "cls.pt"), num_heads=4)
    torch.testing.assert_close(classifier(x), classifier.classify_batch(classifier.pack_ids(ids)), atol=1e-5, rtol=0)
    torch.testing.assert_close(classifier(x), torchtext_head(head, ref).detach(), atol=1e-4, rtol=0)


def test_current_names_are_those_of_torch_nn_transformer_encoder(hf, head, ids):
    """The "current" names load strictly into a module tree built like torchtext's current
    RobertaModel (torch.nn.TransformerEncoder inside), and that module computes what HF computes."""
    h, f = TINY["hidden_size"], TINY["intermediate_size"]

    class PositionalEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(TINY["max_position_embeddings"], h, padding_idx=1)

    transformer = nn.Module()
    transformer.token_embedding = nn.Embedding(TINY["vocab_size"], h, padding_idx=1)
    transformer.positional_embedding = PositionalEmbedding()
    transformer.embedding_layer_norm = nn.LayerNorm(h)
    layer = nn.TransformerEncoderLayer(h, 4, f, dropout=0.0, activation="gelu", batch_first=True)
    transformer.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.transformer = transformer
    model.head = make_head(h)
    model.load_state_dict(to_torchtext(hf, "current", head), strict=True)
    model.eval()

    x = padded(ids)
    pad = x.eq(1)
    pos = torch.cumsum(~pad, dim=1) * ~pad + 1                     # torchtext PositionalEmbedding
    with torch.no_grad():
        emb = transformer.embedding_layer_norm(transformer.token_embedding(x) + transformer.positional_embedding.embedding(pos))
        features = transformer.layers(emb, src_key_padding_mask=pad)
        torch.testing.assert_close(torchtext_head(model.head, features), torchtext_head(head, hf_hidden(hf, x)),
                                   atol=1e-4, rtol=0)


def test_encoder_only_state_dict_without_the_encoder_prefix(tmp_path, hf, ids):
    """RobertaEncoder.state_dict() (model.encoder saved alone) names keys from `transformer.`."""
    state = {k.removeprefix("encoder."): v for k, v in to_torchtext(hf, "legacy").items()}
    model = packformer.load(save(tmp_path, state), num_heads=4)
    torch.testing.assert_close(model(padded(ids)), hf_hidden(hf, padded(ids)) * (padded(ids) != 1).unsqueeze(-1),
                               atol=1e-4, rtol=0)


def test_heads_inferred_from_hidden_size(tmp_path):
    """Without num_heads or a preset, heads = hidden // 64 (XLM-R's head_dim)."""
    hf = make_hf(seed=3, hidden_size=128, num_attention_heads=2, intermediate_size=64)
    ids = random_ids(3, 20, TINY["vocab_size"], seed=3)
    model = packformer.load(save(tmp_path, to_torchtext(hf, "legacy")))
    assert model.config.num_heads == 2
    ref = hf_hidden(hf, padded(ids))
    torch.testing.assert_close(model(padded(ids)), ref * (padded(ids) != 1).unsqueeze(-1), atol=1e-4, rtol=0)


def test_heads_not_inferable_asks_for_num_heads(tmp_path, hf):
    with pytest.raises(ValueError, match="num_heads"):
        load_torchtext(save(tmp_path, to_torchtext(hf, "current")))
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        load_torchtext(save(tmp_path, to_torchtext(hf, "current")), num_heads=5)


# ---- text in: the sentencepiece tokenizer -------------------------------------------------------
def train_spm(folder):
    """A small unigram sentencepiece model (200 pieces -> fairseq ids up to 200 < vocab 202), as in
    tests/test_tokenize.py (test modules cannot import each other under --import-mode=importlib)."""
    import sentencepiece as spm

    rnd = random.Random(0)
    syl = ["ka", "to", "mi", "re", "su", "no", "ha", "ze", "lu", "pa", "qi", "vo", "ya", "ce", "dru", "sch", "ü"]
    words = ["".join(rnd.choice(syl) for _ in range(rnd.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sentencepiece.bpe"),
                                   vocab_size=200, model_type="unigram", character_coverage=1.0, minloglevel=2)
    return folder / "sentencepiece.bpe.model"


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


TEXTS = ["kato mire", "Hello world", "", "zedru schü kapa " * 30, "sumi"]


def test_texts_end_to_end_with_sentencepiece(tmp_path, hf, head, spm_file):
    from transformers import XLMRobertaTokenizer

    path = save(tmp_path, to_torchtext(hf, "legacy", head))
    model = packformer.load(path, spm=spm_file, num_heads=4, max_seq_len=24)
    ref_tok = XLMRobertaTokenizer.from_pretrained(str(spm_file.parent))
    ref_ids = [ref_tok(t, truncation=True, max_length=24)["input_ids"] for t in TEXTS]
    assert model.token_ids(TEXTS) == ref_ids
    assert model.pad_id == 1 and max(len(s) for s in ref_ids) == 24

    x = padded(ref_ids)
    features = hf_hidden(hf, x)                                                        # [B, L, H]
    mask = (x != 1).unsqueeze(-1)
    mean = (features * mask).sum(1) / mask.sum(1)
    np_close = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(model.encode(TEXTS)), mean, **np_close)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(model.classify(TEXTS)), torchtext_head(head, features), **np_close)


def test_truncation_follows_the_torchtext_transform(tmp_path, hf, spm_file):
    model = packformer.load(save(tmp_path, to_torchtext(hf, "current")), spm=spm_file, num_heads=4,
                            max_seq_len=16)
    full = model.tokenizer.encode_raw([TEXTS[3]])[0]
    cut = model.token_ids([TEXTS[3]])[0]
    assert cut == [0] + full[1:-1][:14] + [2]        # T.Truncate(16 - 2), then <s> and </s>
    with pytest.raises(ValueError, match=rf"texts\[1\] has {len(full)} tokens, more than the model's maximum of 16"):
        model.encode(["kato", TEXTS[3]], truncate=False)


def test_without_spm_there_is_no_tokenizer(tmp_path, hf, ids):
    model = packformer.load(save(tmp_path, to_torchtext(hf, "current")), num_heads=4)
    assert model.tokenizer is None
    with pytest.raises(RuntimeError, match="no tokenizer"):
        model.encode(["kato"])
    assert model(padded(ids)).shape == (len(ids), max(map(len, ids)), TINY["hidden_size"])


def test_spm_larger_than_the_vocabulary_is_refused(tmp_path, spm_file):
    small = make_hf(seed=4, vocab_size=100)
    with pytest.raises(ValueError, match="has 200 pieces.*vocabulary of 100"):
        load_torchtext(save(tmp_path, to_torchtext(small, "current")), spm=spm_file, num_heads=4)


# ---- maximum length and presets ---------------------------------------------------------------
@pytest.mark.parametrize("hidden, heads, expected", [(768, 12, 256), (1024, 16, 512)])
def test_max_seq_length_follows_base_and_large(tmp_path, hidden, heads, expected):
    """The bundles truncate content to 254 (base) / 510 (large): 256 / 512 tokens with <s> and </s>.
    Only the hidden size is XLM-R's here (1 layer, vocab 10), to keep the file small."""
    hf = make_hf(seed=5, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1,
                 intermediate_size=32, vocab_size=10, max_position_embeddings=514)
    path = save(tmp_path, to_torchtext(hf, "current"))
    parts = load_torchtext(path)
    assert parts.config.num_heads == heads and parts.max_seq_length == expected
    assert load_torchtext(path, max_seq_len=100).max_seq_length == 100
    preset = "xlmr-base" if hidden == 768 else "xlmr-large"   # a preset must fit every size in the file
    with pytest.raises(ValueError, match=f"preset '{preset}'.*num_layers .* \\(checkpoint: 1\\)"):
        load_torchtext(path, preset=preset)


def test_preset_sets_heads_and_length(tmp_path, monkeypatch):
    """With a preset of matching shape, heads and max length come from the preset."""
    import packformer.loaders.torchtext as tt
    from packformer.config import EncoderConfig

    hf = make_hf(seed=6, hidden_size=48, num_attention_heads=4)
    monkeypatch.setitem(tt.PRESETS, "xlmr-base", EncoderConfig(
        vocab_size=202, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=80, max_position_embeddings=40))
    parts = load_torchtext(save(tmp_path, to_torchtext(hf, "current")), preset="xlmr-base")
    assert parts.config.num_heads == 4 and parts.max_seq_length == 38   # min(256, the 38 the table holds)


def test_bad_max_seq_len_and_preset(tmp_path, hf):
    path = save(tmp_path, to_torchtext(hf, "current"))
    with pytest.raises(ValueError, match=r"max_seq_len=39 must be in \[3, 38\]"):
        load_torchtext(path, num_heads=4, max_seq_len=39)
    with pytest.raises(ValueError, match="unknown torchtext preset 'bert-base'"):
        load_torchtext(path, preset="bert-base")


# ---- checkpoints that do not fit ----------------------------------------------------------------
def test_missing_keys_are_all_named(tmp_path, hf, head):
    state = to_torchtext(hf, "legacy", head)
    gone = ["encoder.transformer.layers.0.residual_mlp.mlp.0.weight", "encoder.transformer.layers.1.final_layer_norm.bias",
            "encoder.transformer.positional_embedding.embedding.weight", "head.dense.bias"]
    for k in gone:
        del state[k]
    with pytest.raises(CheckpointError, match="missing keys \\(4\\)") as e:
        load_torchtext(save(tmp_path, state), num_heads=4)
    assert all(k in str(e.value) for k in gone) and "legacy" in str(e.value)


def test_unused_keys_are_all_named(tmp_path, hf):
    state = to_torchtext(hf, "current")
    state["encoder.transformer.layers.layers.0.extra.weight"] = torch.zeros(2)
    state["lm_head.dense.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="unused keys \\(2\\)") as e:
        load_torchtext(save(tmp_path, state), num_heads=4)
    assert "encoder.transformer.layers.layers.0.extra.weight" in str(e.value) and "lm_head.dense.weight" in str(e.value)


def test_mixed_schemes_name_the_stray_keys(tmp_path, hf):
    state = to_torchtext(hf, "current")
    legacy = to_torchtext(hf, "legacy")
    stray = "encoder.transformer.layers.1.attention_layer_norm.weight"
    state[stray] = legacy[stray]
    with pytest.raises(CheckpointError, match=f"unused keys \\(1\\): {stray}"):
        load_torchtext(save(tmp_path, state), num_heads=4)


def test_wrong_shapes_are_named_with_expected_and_found(tmp_path, hf, head):
    state = to_torchtext(hf, "current", head)
    k = "encoder.transformer.layers.layers.1.linear2.weight"
    state[k] = state[k][:, :-1]
    state["head.dense.weight"] = state["head.dense.weight"][:-1]
    with pytest.raises(CheckpointError, match="shape mismatches \\(2\\)") as e:
        load_torchtext(save(tmp_path, state), num_heads=4)
    assert f"{k}: expected (48, 80), found (48, 79)" in str(e.value)
    assert "head.dense.weight: expected (48, 48), found (47, 48)" in str(e.value)


def test_num_classes_must_match_the_head(tmp_path, hf, head):
    with_head = save(tmp_path, to_torchtext(hf, "current", head), "h.pt")
    assert load_torchtext(with_head, num_heads=4, num_classes=NUM_CLASSES).config.num_labels == NUM_CLASSES
    with pytest.raises(CheckpointError, match="num_classes=2 .* a head with 3 classes"):
        load_torchtext(with_head, num_heads=4, num_classes=2)
    with pytest.raises(CheckpointError, match="num_classes=2 .* no classification head"):
        load_torchtext(save(tmp_path, to_torchtext(hf, "current"), "e.pt"), num_heads=4, num_classes=2)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        packformer.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torchtext(tmp_path / "nope.pt")


@pytest.mark.parametrize("content, msg", [
    ({"model": {"w": torch.zeros(1)}}, "not a flat state dict: entries that are not tensors: model"),
    ([torch.zeros(1)], "holds a list"),
    ({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, "looks like a Hugging Face state dict"),
    ({"encoder.transformer.token_embedding.weight": torch.zeros(5, 8)}, "no encoder layers"),
])
def test_files_that_are_not_torchtext_state_dicts(tmp_path, content, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_torchtext(save(tmp_path, content))


def test_pickled_module_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="weights_only=True.*not pickled modules"):
        load_torchtext(path)
