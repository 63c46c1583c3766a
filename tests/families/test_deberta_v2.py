"""DeBERTa-v2/v3: random-weight transformers DebertaV2Model / DebertaV2ForSequenceClassification folders
loaded by packformer give transformers' hidden states and logits on packed batches whose lengths lie on
both sides of every change of the relative-position index (log buckets 8, max_relative_positions 32:
exact up to 4 tokens apart, log-spaced to 31, and the first index reached only past 32 on one side).

transformers (modeling_deberta_v2.py): scores = (q.k + c2p + p2c) / sqrt(d * 3), c2p[i, j] = q_i . Wk r[idx],
p2c[i, j] = k_j . Wq r[idx], idx = clamp(log_bucket(i - j) + 8, 0, 15), r = LayerNorm(rel_embeddings)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import packformer
from packformer.bench.convert import to_hf
from packformer.config import preset
from packformer.engine import Model
from packformer.families import family_of
from packformer.heads import Pooler
from packformer.loaders.parts import ModelParts
from packformer.model import Encoder
from packformer.ops.disentangled import DisentangledConfig, distance_index
from tests.families.harness import (check_alone_equals_batched, check_hidden_states, packed_reference,
                                    perturb_norms, ragged_ids, run_packed)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, layer_norm_eps=1e-7, hidden_act="gelu", relative_attention=True,
            position_buckets=8, max_relative_positions=32, pos_att_type="p2c|c2p", share_att_key=True,
            norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
# the older v2 options: absolute positions too, token types, raw distances clipped at 16, c2p only, no norm
V2_STYLE = dict(TINY, position_biased_input=True, type_vocab_size=2, position_buckets=-1, max_relative_positions=16,
                pos_att_type="c2p", norm_rel_ebd="none")
LABELS = {0: "neg", 1: "neu", 2: "pos"}


def edge_lengths(cfg: DisentangledConfig, longest: int = 64) -> list[int]:
    """Lengths whose largest distance lies on both sides of every change of the relative index, plus 1,
    2 and the longest the model takes."""
    r = distance_index(cfg, longest)
    c = (r.shape[0] - 1) // 2
    out = {1, 2, longest}
    for d in range(1, longest):
        if r[c + d] != r[c + d - 1] or r[c - d] != r[c - d + 1]:
            out |= {d, d + 1, d + 2}                     # largest distance d - 1, d, d + 1
    return sorted(n for n in out if n <= longest)


def _dis(kw: dict) -> DisentangledConfig:
    return DisentangledConfig(kw["position_buckets"], kw["max_relative_positions"],
                              tuple(kw["pos_att_type"].split("|")))


def _hf(kw: dict = TINY, classification: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if classification:
        kw = dict(kw, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    cfg = transformers.DebertaV2Config(**kw)
    cls = transformers.DebertaV2ForSequenceClassification if classification else transformers.DebertaV2Model
    m = cls(cfg).eval()
    perturb_norms(m)
    with torch.no_grad():   # peaked attention and a relative table that matters, so a wrong term, index or scale shows
        for layer in m.base_model.encoder.layer:
            for p in (layer.attention.self.query_proj, layer.attention.self.key_proj):
                p.weight.normal_(0.0, 0.15)
        m.base_model.encoder.rel_embeddings.weight.normal_(0.0, 1.0)
        if classification:
            m.classifier.weight.normal_(0.0, 0.5)
            m.pooler.dense.weight.normal_(0.0, 0.2)
    return m


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    m = _hf()
    folder = tmp_path_factory.mktemp("deberta")
    m.save_pretrained(folder)
    return m, folder


@pytest.fixture(scope="module")
def hf_classifier_folder(tmp_path_factory):
    m = _hf(classification=True)
    folder = tmp_path_factory.mktemp("deberta-cls")
    m.save_pretrained(folder)
    return m, folder


def _inputs(m, lengths, seed=1):
    return ragged_ids(lengths, (4, m.config.vocab_size - 1), m.config.pad_token_id, seed=seed)


# -- transformers parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["v3", "v2"])
def test_hidden_states_match_transformers_across_bucket_edges(tmp_path, style):
    kw = TINY if style == "v3" else V2_STYLE
    hf = _hf(kw)
    hf.save_pretrained(tmp_path)
    lengths = edge_lengths(_dis(kw))
    ids, mask, seqs = _inputs(hf, lengths)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    errs = check_hidden_states(tmp_path, ref, seqs, atol=1e-4)
    print(f"deberta-v2 ({style}) hidden states, lengths {lengths}, max abs error vs transformers: {errs}")


def test_the_relative_terms_matter(hf_folder):
    """The test model is sensitive to what this family adds: without the c2p / p2c terms its outputs
    move far beyond the tolerance above."""
    hf, folder = hf_folder
    lengths = [9, 40]
    ids, mask, seqs = _inputs(hf, lengths)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    m = packformer.load(folder, fast=False)
    with torch.no_grad():
        m.encoder.rel_norm.weight.zero_()
        m.encoder.rel_norm.bias.zero_()                   # r = 0: only the qkv biases' share remains
    assert (run_packed(m, seqs) - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("fast", [False, True])
def test_sequence_classification_logits_match_transformers(hf_classifier_folder, fast):
    hf, folder = hf_classifier_folder
    lengths = [1, 5, 6, 17, 33, 64]
    ids, mask, seqs = _inputs(hf, lengths)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    m = packformer.load(folder, fast=fast)
    assert m.num_labels == 3 and m.config.labels() == ["neg", "neu", "pos"]
    logits = m.classify_batch(m.pack_ids(seqs))
    err = (logits - ref).abs().max().item()
    print(f"deberta-v2 logits ({'fast' if fast else 'reference'}), max abs error vs transformers: {err:.3g}")
    assert err <= 1e-4
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_padded_drop_in_matches_transformers(hf_folder):
    hf, folder = hf_folder
    lengths = [3, 17, 40]
    ids, mask, _ = _inputs(hf, lengths)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = packformer.load(folder)(ids)
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    assert torch.count_nonzero(out[~mask.bool()]) == 0


def test_config_maps_deberta_conventions(hf_folder):
    _, folder = hf_folder
    m = packformer.load(folder)
    cfg = m.config
    assert (cfg.family, cfg.model_type, cfg.type_vocab_size, cfg.position_embedding) == \
        ("deberta_v2", "deberta-v2", 0, "none")
    assert cfg.disentangled == DisentangledConfig(8, 32, ("c2p", "p2c"), True, "layer_norm")
    assert cfg.architecture()["positions"] == "disentangled relative (c2p+p2c, 16 relative embeddings)"
    assert m.encoder.rel_embeddings.weight.shape == (16, TINY["hidden_size"]) and m.encoder.embeddings.position is None
    # max_relative_positions -1 means max_position_embeddings, as in the released v3 configs
    d = dict(json.loads((folder / "config.json").read_text()), max_relative_positions=-1, position_buckets=256)
    assert family_of(d).config_from_hf(d).disentangled.max_relative_positions == TINY["max_position_embeddings"]


# -- tokenizer and sentence-transformers ---------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "hello", "world", "packed", "tokens", "relative"]


def _spm_model(path) -> None:
    """A small sentencepiece unigram model with DeBERTa-v3's special ids: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3."""
    import io
    spm = pytest.importorskip("sentencepiece")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(300)] + ["Hello, World! CATS sitting? 0123456789 "
                                                                        "abcdefghijklmnopqrstuvwxyz"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
                                   bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


def _spm_folder(root, hf) -> None:
    """The layout of microsoft/deberta-v3-*: the HF model, spm.model and tokenizer_config.json only."""
    hf.save_pretrained(root)
    _spm_model(root / "spm.model")
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer",
                                                            "do_lower_case": False}))


def _st_folder(root, hf) -> None:
    """A sentence-transformers folder around a DeBERTa-v3 model whose tokenizer.json transformers wrote
    from spm.model (as newer DeBERTa folders carry), mean pooling, Normalize, max_seq_length 40."""
    _spm_folder(root, hf)
    transformers.AutoTokenizer.from_pretrained(root).save_pretrained(root)          # writes tokenizer.json
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_mean_tokens": True}))
    (root / "2_Normalize").mkdir()
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": False}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, n)) for n in (0, 1, 3, 4, 8, 16, 17, 31, 60)] + \
        ["Hello, World!", "   ", "CATS sitting?"]


def test_sentence_transformers_folder_encodes_like_sentence_transformers(tmp_path, hf_folder):
    st_mod = pytest.importorskip("sentence_transformers")
    _st_folder(tmp_path, hf_folder[0])
    texts = _texts()
    ref = st_mod.SentenceTransformer(str(tmp_path), device="cpu").encode(texts)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for fast in (False, True):
        m = packformer.load(tmp_path, fast=fast)
        assert m.pooler.normalize and m.max_seq_length == 40
        ids = m.token_ids(texts)
        assert ids == [hf_tok(t, truncation=True, max_length=40)["input_ids"] for t in texts]
        assert ids[0][0] == 1 and ids[0][-1] == 2 and max(map(len, ids)) == 40
        got = m.encode(texts)
        err = float(np.abs(got - ref).max())
        print(f"deberta-v2 sentence-transformers ({'fast' if fast else 'reference'}), max abs error: {err:.3g}")
        assert err <= 1e-5


def test_folder_with_only_spm_model_loads_without_a_tokenizer_and_says_why(tmp_path, hf_folder, caplog):
    """microsoft/deberta-v3-* folders ship spm.model without tokenizer.json: the weights load, and the
    missing tokenizer is named at load (with how to write tokenizer.json) and when texts are given."""
    _spm_folder(tmp_path, hf_folder[0])
    with caplog.at_level(logging.WARNING):
        m = packformer.load(tmp_path)
    assert m.tokenizer is None
    assert "spm.model" in caplog.text and "tokenizer.json" in caplog.text
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m.encode(["hello world"])
    assert m.embed_batch(m.pack_ids([[1, 5, 6, 2]])).shape == (1, TINY["hidden_size"])


# -- batching, dtypes, int8 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{}, {"dtype": "bfloat16"}, {"quantize": "int8"}])
def test_alone_equals_batched_on_the_cpu_fast_path(hf_folder, mode):
    hf, folder = hf_folder
    _, _, seqs = _inputs(hf, [5, 33, 9, 64, 9, 1, 17])
    check_alone_equals_batched(folder, seqs, fast=True, **mode)


def test_bfloat16_and_int8_run(hf_folder):
    hf, folder = hf_folder
    lengths = [4, 23, 33, 64]
    _, _, seqs = _inputs(hf, lengths)
    fp32 = packformer.load(folder, fast=True)
    want = fp32.embed_batch(fp32.pack_ids(seqs))                                         # [B, H]
    bf16 = packformer.load(folder, dtype="bfloat16")
    h = run_packed(bf16, seqs)
    assert h.shape == (sum(lengths), TINY["hidden_size"]) and torch.isfinite(h).all()
    int8 = packformer.load(folder, quantize="int8")
    got = int8.embed_batch(int8.pack_ids(seqs))
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    print(f"deberta-v2 int8 pooled cosine vs fp32: min {cos.min().item():.5f}")
    assert cos.min().item() >= 0.99, cos


# -- presets and the transformers peer -----------------------------------------------------------------------

def _peer_agrees(m, lengths) -> float:
    """Max abs difference between our hidden states and those of the transformers model that
    bench.convert.to_hf builds from our weights."""
    hf = to_hf(m.encoder, attn_implementation="eager")
    assert isinstance(hf, transformers.DebertaV2Model)
    cfg = m.config
    ids, mask, seqs = ragged_ids(lengths, cfg.regular_id_range(), cfg.pad_token_id)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    return (run_packed(m, seqs) - ref).abs().max().item()


def test_random_preset_loads_and_its_shape_has_a_transformers_peer():
    m = packformer.load("random:deberta-v3-base", fast=False)
    cfg = m.config
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == \
        ("deberta_v2", 768, 12, 12, 128100)
    assert cfg.disentangled == DisentangledConfig(256, 512) and preset("deberta-v3-large").hidden_size == 1024
    assert m.encoder.rel_embeddings.weight.shape == (512, 768)
    assert torch.isfinite(run_packed(m, [[1, 500, 600, 2]])).all()
    # the preset's layer shapes and buckets (2 layers, a small vocabulary: the full model is the slow test
    # below); 140 tokens reach distances past 128, where DeBERTa-v3's log buckets start
    cfg2 = preset("deberta-v3-base", num_layers=2, vocab_size=1000)
    torch.manual_seed(0)
    enc = Encoder(cfg2).eval()
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.normal_(0.0, 0.02) if p.dim() == 2 else p.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.1)
    parts = ModelParts(config=cfg2, encoder=enc, head=None, pooler=Pooler(), tokenizer=None,
                       max_seq_length=cfg2.max_tokens_per_sequence, source="test", format="random")
    assert _peer_agrees(Model(parts, fast=False), [140, 3]) <= 1e-4


@pytest.mark.slow
def test_full_random_preset_and_its_transformers_peer_agree():
    assert _peer_agrees(packformer.load("random:deberta-v3-base", fast=False), [140, 3]) <= 1e-4


def test_classifier_peer_reproduces_our_head():
    cfg = family_of("deberta-v2").config_from_hf(dict(TINY, model_type="deberta-v2"))
    cfg = cfg.replace(num_labels=3)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    head = family_of("deberta-v2").make_head(cfg).eval()
    with torch.no_grad():
        enc.rel_embeddings.weight.normal_(0.0, 1.0)
        head.dense.weight.normal_(0.0, 0.2)
        head.out.weight.normal_(0.0, 0.5)
    hf = to_hf(enc, head, attn_implementation="eager", with_head=True)
    assert isinstance(hf, transformers.DebertaV2ForSequenceClassification)
    parts = ModelParts(config=cfg, encoder=enc, head=head, pooler=Pooler(), tokenizer=None,
                       max_seq_length=cfg.max_tokens_per_sequence, source="test", format="random")
    m = Model(parts, fast=False)
    lengths = [2, 40, 64]
    ids, mask, seqs = ragged_ids(lengths, (4, 299), cfg.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(m.classify_batch(m.pack_ids(seqs)), ref, atol=1e-4, rtol=0)


# -- unsupported options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"conv_kernel_size": 3}, "conv_kernel_size=3: the convolution"),
    ({"share_att_key": False}, "share_att_key=False"),
    ({"embedding_size": 32}, "embedding_size=32"),
    ({"attention_head_size": 32}, "attention_head_size=32"),
    ({"relative_attention": False}, "relative_attention=False"),
    ({"pos_att_type": "c2p|p2p"}, "pos_att_type='c2p|p2p'"),
    ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd='batch_norm'"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
])
def test_unsupported_config_options_fail_clearly(change, match):
    d = dict(TINY, model_type="deberta-v2", **change)
    with pytest.raises(ValueError, match=match):
        family_of(d).config_from_hf(d)


def test_unsupported_head_and_peer_fail_clearly():
    d = dict(TINY, model_type="deberta-v2", architectures=["DebertaV2ForSequenceClassification"], num_labels=2,
             pooler_hidden_act="tanh")
    with pytest.raises(ValueError, match="pooler_hidden_act='tanh'"):
        family_of(d).config_from_hf(d)
    bad = family_of("deberta-v2").config_from_hf(dict(TINY, model_type="deberta-v2")).replace(norm_first=True)
    with pytest.raises(ValueError, match="cannot reproduce"):
        to_hf(Encoder(bad), attn_implementation="eager")


# -- GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp16_fast_path_matches_the_cpu_reference(hf_classifier_folder):
    """fp16 CUDA fast path (the disentangled flash kernel; CUDA graphs once a shape repeats, eager
    before) against the fp32 CPU reference."""
    hf, folder = hf_classifier_folder
    lengths = edge_lengths(_dis(TINY)) + [9, 17, 33]
    _, _, seqs = _inputs(hf, lengths)
    ref_m = packformer.load(folder, device="cpu", fast=False)
    gpu_m = packformer.load(folder, device="cuda", dtype="float16", fast=True)
    assert type(gpu_m.runner).__name__ == "GraphRunner"
    assert type(gpu_m.runner.forward).__name__ == "FastEncoder"
    ref = run_packed(ref_m, seqs)
    for _ in range(3):                        # eager first, then captured and replayed
        got = run_packed(gpu_m, seqs)
        assert torch.isfinite(got).all()
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)                    # [T]
        assert cos.min().item() >= 0.9995, f"lowest per-token cosine {cos.min().item():.6f}"
    assert gpu_m.runner.describe()["replays"] >= 1          # the graph path ran and agreed
    want = ref_m.classify_batch(ref_m.pack_ids(seqs))
    logits = gpu_m.classify_batch(gpu_m.pack_ids(seqs)).float().cpu()
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
