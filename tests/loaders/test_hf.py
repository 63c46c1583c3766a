"""Hugging Face folders: random-initialised transformers models saved to disk and loaded by packformer
give the same hidden states / logits (fp32, within 1e-4)."""
import json

import numpy as np
import pytest
import torch

import packformer
from packformer.loaders.hf import config_from_hf
from packformer.loaders.keymap import CheckpointError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=1000, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=80)


def _hf_model(kind: str, classification: bool, **extra):
    torch.manual_seed(0)
    cfg_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "xlm-roberta": transformers.XLMRobertaConfig}[kind]
    model_cls = {
        ("bert", False): transformers.BertModel, ("bert", True): transformers.BertForSequenceClassification,
        ("roberta", False): transformers.RobertaModel, ("roberta", True): transformers.RobertaForSequenceClassification,
        ("xlm-roberta", False): transformers.XLMRobertaModel,
        ("xlm-roberta", True): transformers.XLMRobertaForSequenceClassification,
    }[(kind, classification)]
    kw = dict(TINY, **extra)
    if classification:
        kw.update(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    cfg = cfg_cls(**kw, attn_implementation="eager")
    m = model_cls(cfg).eval()
    with torch.no_grad():   # untrained LayerNorms are identity: perturb them so a swapped weight shows
        for n, p in m.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ragged_ids(pad_id: int, lengths=(7, 3, 12, 1 + 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, TINY["vocab_size"], (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_hidden_states_match_transformers(tmp_path, kind):
    hf = _hf_model(kind, classification=False)
    hf.save_pretrained(tmp_path)
    pad = hf.config.pad_token_id
    ids, mask = _ragged_ids(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = packformer.load(tmp_path)
    seqs = [row[: int(k.sum())].tolist() for row, k in zip(ids, mask)]
    h = m.hidden_states(m.pack_ids(seqs))
    assert torch.allclose(h, ref[mask.bool()], atol=1e-4, rtol=0)
    # the tutorial drop-in: padded ids in, padded hidden states out (zeros at padding)
    out = m(ids)
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    assert torch.count_nonzero(out[~mask.bool()]) == 0


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_sequence_classification_logits_match_transformers(tmp_path, kind):
    hf = _hf_model(kind, classification=True)
    hf.save_pretrained(tmp_path)
    ids, mask = _ragged_ids(hf.config.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    m = packformer.load(tmp_path)
    assert m.num_labels == 3 and m.config.labels() == ["neg", "neu", "pos"]
    seqs = [row[: int(k.sum())].tolist() for row, k in zip(ids, mask)]
    logits = m.classify_batch(m.pack_ids(seqs))
    assert torch.allclose(logits, ref, atol=1e-4, rtol=0)
    assert torch.allclose(m(ids), ref, atol=1e-4, rtol=0)


def test_pytorch_model_bin_is_loaded_with_weights_only(tmp_path):
    hf = _hf_model("bert", classification=False)
    hf.save_pretrained(tmp_path)   # transformers >= 5 writes safetensors only: convert to the old format
    from safetensors.torch import load_file
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    ids, mask = _ragged_ids(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = packformer.load(tmp_path)
    assert torch.allclose(m(ids)[mask.bool()], ref[mask.bool()], atol=1e-4)


def test_text_in_text_out_with_the_folder_tokenizer(tmp_path, minilm_dir):
    """A BERT folder with tokenizer.json: encode() tokenizes like transformers' tokenizer."""
    hf = _hf_model("bert", classification=False, vocab_size=30522, max_position_embeddings=512)
    hf.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / f).write_bytes((minilm_dir / f).read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello world", "How are you!", "", "a much longer sentence with several words in it"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state
    m = packformer.load(tmp_path)
    assert m.token_ids(texts) == [tok(t)["input_ids"] for t in texts]
    mean_ref = (ref * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
    assert np.abs(m.encode(texts) - mean_ref.numpy()).max() < 1e-4


def test_missing_unused_and_misshapen_keys_are_all_named(tmp_path):
    hf = _hf_model("bert", classification=False)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.0.extra.weight"] = torch.zeros(2)
    sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        packformer.load(tmp_path)
    msg = str(e.value)
    assert "encoder.layer.1.output.dense.bias" in msg and "missing" in msg
    assert "encoder.layer.0.extra.weight" in msg and "unused" in msg
    assert "encoder.layer.0.intermediate.dense.weight" in msg and "(96, 48)" in msg


def test_unknown_or_missing_paths_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        packformer.load(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown model folder format"):
        packformer.load(tmp_path)
    with pytest.raises(ValueError, match="unknown model file format"):
        packformer.load(tmp_path / "x.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        packformer.load(tmp_path)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, msg", [
    (lambda d: (d / "config.json").write_text("{not json"), r"config.json is not valid JSON: Expecting property"),
    (lambda d: _edit_config(d, hidden_size=None), r"config.json lacks 'hidden_size', which a bert config needs"),
    (lambda d: _edit_config(d, hidden_size="48"), r"config.json: hidden_size must be an integer, got '48'"),
    (lambda d: _edit_config(d, num_hidden_layers=0), r"config.json: num_layers must be at least 1, got 0"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), r"tokenizer.json is not a readable tokenizer"),
], ids=["config-not-json", "config-lacks-a-key", "config-wrong-type", "config-no-layers", "weights-truncated",
        "tokenizer-corrupt"])
def test_a_damaged_folder_is_refused_naming_the_file_and_what_is_wrong(tmp_path, minilm_dir, damage, msg):
    _hf_model("bert", classification=False).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((minilm_dir / "tokenizer.json").read_text())
    damage(tmp_path)
    with pytest.raises(ValueError, match=msg) as e:
        packformer.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_config_mapping():
    c = config_from_hf(dict(TINY, model_type="xlm-roberta", pad_token_id=1, hidden_act="gelu", type_vocab_size=1))
    assert c.position_offset == 2 and c.max_tokens_per_sequence == 78 and c.num_labels == 0
    with pytest.raises(ValueError, match="position_embedding_type"):
        config_from_hf(dict(TINY, model_type="bert", position_embedding_type="relative_key"))


def test_an_unknown_model_type_lists_the_families_packformer_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"unsupported model_type 't5' in config.json; packformer loads bert "
                                         r"\(bert/roberta/xlm-roberta/camembert\)"):
        packformer.load(tmp_path)


def test_checkpoint_tensors_are_held_once_in_their_own_dtype(tmp_path, monkeypatch):
    """A bf16 checkpoint's tensors become the model's parameters as they are (no random-initialised fp32
    copy beside them); Model then casts to the run's dtype, with the same values a copy would give."""
    import packformer.loaders.hf as hf_loader
    from packformer.engine import Model
    hf = _hf_model("bert", classification=False).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    read = {}
    real = hf_loader.read_state_dict
    monkeypatch.setattr(hf_loader, "read_state_dict", lambda folder: read.setdefault("state", real(folder)))
    parts = hf_loader.load_hf(tmp_path, with_tokenizer=False)
    word = parts.encoder.embeddings.word.weight
    src = read["state"]["embeddings.word_embeddings.weight"]
    assert word.dtype == torch.bfloat16 and word.data_ptr() == src.data_ptr()
    assert not any(p.is_meta for p in parts.encoder.parameters())
    m = Model(parts)                                         # CPU: fp32, exactly the bf16 values
    assert m.encoder.embeddings.word.weight.dtype == torch.float32
    assert torch.equal(m.encoder.embeddings.word.weight, src.float())


def test_an_optional_parameter_the_checkpoint_lacks_is_zeros_with_a_warning(caplog):
    from packformer.config import preset
    from packformer.families import family_named
    from packformer.loaders.parts import assemble
    from packformer.model import Encoder
    cfg = preset("minilm-l6").replace(num_layers=1, vocab_size=50, max_position_embeddings=16)
    with torch.device("meta"):
        want = Encoder(cfg).state_dict()
    keymap = family_named("bert").keymap(cfg, False)
    state = {k: torch.randn(v.shape) for k, v in keymap.invert({k: torch.empty(v.shape) for k, v in want.items()},
                                                                 1).items() if "token_type" not in k}
    with caplog.at_level("WARNING"):
        enc, head = assemble(lambda: (Encoder(cfg), None), keymap, state, 1, what="test checkpoint")
    assert head is None and torch.equal(enc.embeddings.token_type.weight, torch.zeros(cfg.type_vocab_size, cfg.hidden_size))
    assert "test checkpoint has no value for embeddings.token_type.weight: zeros" in caplog.text
