"""DistilBERT: a random-weight transformers DistilBertModel / DistilBertForSequenceClassification, saved with
save_pretrained, loads in packformer and gives the same hidden states and logits on a packed batch, on the
reference and the CPU fast path, with a learned or a sinusoidal position table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import packformer
from packformer.bench.convert import to_hf
from packformer.families import family_of

from .harness import (check_alone_equals_batched, check_hidden_states, packed_reference, perturb_norms,
                      ragged_ids, run_packed)

transformers = pytest.importorskip("transformers")

MAX_POS = 192   # >= the int8 calibration batch's longest sequence (fast/quant.py: 160 tokens)
# DistilBERT has no window or bucket: the edges are one token and the whole position table
LENGTHS = [1, 2, 7, MAX_POS - 1, MAX_POS, 17, 3, MAX_POS]
VOCAB = (5, 1000)


def hf_config(sinusoidal: bool = False, **changes):
    kw = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=MAX_POS,
              sinusoidal_pos_embds=sinusoidal, activation="gelu", pad_token_id=0)
    kw.update(changes)
    return transformers.DistilBertConfig(**kw)


def sinusoid(n_pos: int, dim: int) -> torch.Tensor:
    """transformers' create_sinusoidal_embeddings, restated: sin on even columns, cos on odd ones."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -2 * (torch.arange(dim) // 2).double() / dim)[None, :]
    angle = pos * freq                                                             # [P, D]
    return torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos()).float()


def saved(tmp_path, classification: bool = False, seed: int = 0, name: str = "m", **cfg):
    torch.manual_seed(seed)
    cls = transformers.DistilBertForSequenceClassification if classification else transformers.DistilBertModel
    c = hf_config(**cfg)
    if classification:
        c.num_labels, c.id2label, c.label2id = 3, {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    model = cls(c).eval()
    perturb_norms(model, seed=seed)
    if classification:
        with torch.no_grad():            # a head wide enough that the logits differ between sequences
            model.pre_classifier.weight.normal_(0, 0.3)
            model.classifier.weight.normal_(0, 0.5)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("sinusoidal", [False, True], ids=["learned", "sinusoidal"])
def test_hidden_states_equal_transformers_on_both_paths(tmp_path, sinusoidal):
    hf, folder = saved(tmp_path, sinusoidal=sinusoidal)
    table = hf.embeddings.position_embeddings.weight
    if sinusoidal:   # the fixed table is in the checkpoint like a learned one: loading it reproduces it
        assert torch.allclose(table, sinusoid(MAX_POS, 64), atol=1e-6)
    ids, mask, seqs = ragged_ids(LENGTHS, VOCAB, pad_id=0)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, LENGTHS)
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    assert set(errs) == {"reference", "fast"}
    m = packformer.load(folder)
    assert torch.equal(m.encoder.embeddings.position.weight, table.detach())
    assert m.encoder.embeddings.token_type is None and m.config.position_offset == 0


def test_sinusoidal_table_is_read_from_the_checkpoint_not_recomputed(tmp_path):
    """transformers loads whatever table the checkpoint holds, sinusoidal or not: so does packformer."""
    hf, folder = saved(tmp_path, sinusoidal=True)
    with torch.no_grad():
        hf.embeddings.position_embeddings.weight.mul_(0.5)
    hf.save_pretrained(folder)
    hf2 = transformers.DistilBertModel.from_pretrained(folder).eval()
    m = packformer.load(folder, fast=False)
    assert torch.equal(m.encoder.embeddings.position.weight, hf2.embeddings.position_embeddings.weight.detach())
    ids, mask, seqs = ragged_ids([5, 9], VOCAB, pad_id=0)
    with torch.no_grad():
        ref = packed_reference(hf2(input_ids=ids, attention_mask=mask).last_hidden_state, [5, 9])
    assert (run_packed(m, seqs) - ref).abs().max() <= 1e-4


def test_classifier_logits_equal_transformers(tmp_path):
    hf, folder = saved(tmp_path, classification=True)
    ids, mask, seqs = ragged_ids(LENGTHS, VOCAB, pad_id=0, seed=2)
    with torch.no_grad():   # centre the logits over the batch, so that the argmax differs between sequences
        hf.classifier.bias.sub_(hf(input_ids=ids, attention_mask=mask).logits.mean(0))
        want = hf(input_ids=ids, attention_mask=mask).logits
    hf.save_pretrained(folder)
    assert want.argmax(1).unique().numel() > 1          # the check below can tell sequences apart
    for fast in (False, True):
        m = packformer.load(folder, fast=fast)
        assert m.config.labels() == ["a", "b", "c"] and m.head.act == "relu" and m.head.pooling == "cls"
        got = m.classify_batch(m.pack_ids(seqs))
        assert torch.equal(got.argmax(1), want.argmax(1))
        assert (got - want).abs().max() <= 1e-4, f"fast={fast}"


def test_masked_lm_checkpoint_loads_as_an_encoder(tmp_path):
    """DistilBertForMaskedLM's vocab_transform / vocab_layer_norm / vocab_projector are known and unused."""
    torch.manual_seed(0)
    hf = transformers.DistilBertForMaskedLM(hf_config()).eval()
    hf.save_pretrained(tmp_path)
    ids, mask, seqs = ragged_ids([4, 11], VOCAB, pad_id=0)
    with torch.no_grad():
        ref = packed_reference(hf.distilbert(input_ids=ids, attention_mask=mask).last_hidden_state, [4, 11])
    check_hidden_states(tmp_path, ref, seqs, paths=("reference",))


def test_sentence_transformers_folder_equals_sentence_transformers(tmp_path, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    _, hf_folder = saved(tmp_path, vocab_size=30522, max_position_embeddings=512, name="st/0_Transformer")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (hf_folder / f).write_bytes((minilm_dir / f).read_bytes())
    folder = tmp_path / "st"
    (hf_folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                   "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    texts = ["Hello world", "How are you!", "", "one two three four five six seven " * 20]
    want = st.SentenceTransformer(str(folder), device="cpu").encode(texts)
    m = packformer.load(folder)
    assert m.config.family == "distilbert" and m.max_seq_length == 64
    assert np.abs(m.encode(texts) - want).max() <= 1e-5


def test_alone_equals_batched_in_fp32_bf16_and_int8(tmp_path):
    _, folder = saved(tmp_path)
    _, _, seqs = ragged_ids(LENGTHS, VOCAB, pad_id=0, seed=3)
    check_alone_equals_batched(folder, seqs)
    check_alone_equals_batched(folder, seqs, dtype="bfloat16")
    check_alone_equals_batched(folder, seqs, quantize="int8")
    fp32 = packformer.load(folder)
    batch = fp32.pack_ids(seqs)
    want = fp32.embed_batch(batch)
    for kw in (dict(dtype="bfloat16"), dict(quantize="int8")):
        got = packformer.load(folder, **kw).embed_batch(batch)
        cos = torch.nn.functional.cosine_similarity(got.float(), want, dim=1).min().item()
        assert cos >= 0.99, f"{kw}: cosine {cos:.4f}"


def test_random_preset_and_its_transformers_peer():
    m = packformer.load("random:distilbert-base", fast=False, num_labels=2)
    c = m.config
    assert (c.family, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, c.type_vocab_size) == \
        ("distilbert", 768, 6, 12, 3072, 0)
    assert m.info()["family"] == "distilbert" and m.head.act == "relu"
    assert c.regular_id_range() == (999, 30522)      # BERT's vocabulary: int8 calibration skips [unused*]
    with torch.no_grad():   # random_parts zeroes biases and sets norms to 1: perturb so the peer check bites
        for n, p in m.encoder.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    seqs = m.token_ids(["the peer must read our weights", "a second, longer text with a few more words in it"])
    lens = [len(s) for s in seqs]
    ids = torch.tensor([s + [0] * (max(lens) - len(s)) for s in seqs])
    mask = (torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]).long()
    batch = m.pack_ids(seqs)
    peer = to_hf(m.encoder, m.head, with_head=False)
    assert isinstance(peer, transformers.DistilBertModel)
    with torch.no_grad():
        ref = packed_reference(peer(input_ids=ids, attention_mask=mask).last_hidden_state, lens)
        assert (m.hidden_states(batch) - ref).abs().max() <= 1e-4
        clf = to_hf(m.encoder, m.head, with_head=True)
        assert isinstance(clf, transformers.DistilBertForSequenceClassification)
        assert (m.classify_batch(batch) - clf(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-4


def test_config_mapping_and_unsupported_options(tmp_path):
    d = hf_config(activation="gelu_new").to_dict()
    cfg = family_of(d).config_from_hf(d)
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.activation,
            cfg.layer_norm_eps, cfg.type_vocab_size, cfg.position_offset) == \
        ("distilbert", 64, 2, 4, 128, "gelu_tanh", 1e-12, 0, 0)
    d["activation"] = "quick_gelu"
    with pytest.raises(ValueError, match="activation 'quick_gelu'"):
        family_of(d).config_from_hf(d)
    _, folder = saved(tmp_path)
    cfg_file = folder / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "activation": "quick_gelu"}))
    with pytest.raises(ValueError, match="unsupported activation 'quick_gelu'"):
        packformer.load(folder)


def test_missing_position_table_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from packformer.loaders.keymap import CheckpointError
    _, folder = saved(tmp_path, sinusoidal=True)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["embeddings.position_embeddings.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*embeddings.position_embeddings.weight"):
        packformer.load(folder)


def test_over_length_input_names_the_maximum(tmp_path):
    _, folder = saved(tmp_path)
    m = packformer.load(folder)
    with pytest.raises(ValueError, match=f"maximum of {MAX_POS}"):
        m.pack_ids([[7] * (MAX_POS + 1)])


@pytest.mark.gpu
def test_cuda_fp16_fast_path_matches_the_fp32_cpu_reference(tmp_path):
    _, folder = saved(tmp_path, classification=True)
    lengths = LENGTHS * 4
    _, _, seqs = ragged_ids(lengths, VOCAB, pad_id=0, seed=5)
    ref = packformer.load(folder, device="cpu", fast=False)
    gpu = packformer.load(folder, device="cuda", dtype="float16")
    want = run_packed(ref, seqs)
    for _ in range(3):   # eager, graph capture, replay
        got = run_packed(gpu, seqs)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=1).min().item()
        assert cos >= 0.9995, f"min cosine per token {cos:.5f}"
    batch = ref.pack_ids(seqs)
    assert torch.equal(gpu.classify_batch(batch).cpu().argmax(1), ref.classify_batch(batch).argmax(1))
