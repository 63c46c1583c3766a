"""MPNet: random-weight transformers MPNetModel / MPNetForSequenceClassification folders loaded by
packformer give transformers' hidden states and logits on packed batches whose lengths straddle every
relative-position bucket edge (and the 128-token distance past which all share the last bucket).

transformers adds the bias after the 1/sqrt(d) scaling, for relative_position = key - query, bucketed
by MPNetEncoder.relative_position_bucket with 32 buckets and max_distance 128 (modeling_mpnet.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import packformer
from packformer.bench.convert import to_hf
from packformer.config import RelativeBuckets, preset
from packformer.engine import Model
from packformer.families import family_of
from packformer.heads import Pooler
from packformer.loaders.parts import ModelParts
from packformer.model import Encoder
from tests.families.harness import (check_alone_equals_batched, check_hidden_states, packed_reference,
                                    perturb_norms, ragged_ids, run_packed)

transformers = pytest.importorskip("transformers")
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=258, layer_norm_eps=1e-5, attn_implementation="eager")
LABELS = {0: "neg", 1: "neu", 2: "pos"}


def bucket_edges(max_distance: int = 128, beyond: int = 8) -> list[int]:
    """Distances d > 0 whose transformers bucket differs from d - 1's, and max_distance itself."""
    d = torch.arange(0, max_distance + beyond)
    b = MPNetEncoder.relative_position_bucket(d)
    return sorted({int(x) for x in d[1:][b[1:] != b[:-1]]} | {max_distance})


def edge_lengths() -> list[int]:
    """Sequence lengths whose largest distance (length - 1) lies on both sides of every bucket edge, plus
    1, 2 and one well past max_distance (where the table's last column stands for every distance)."""
    out = {1, 2, 200}
    for e in bucket_edges():
        out |= {e, e + 1, e + 2}          # largest distance e - 1, e, e + 1
    return sorted(out)


def _hf(classification: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(TINY, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}) if classification \
        else dict(TINY)
    cfg = transformers.MPNetConfig(**kw)
    cls = transformers.MPNetForSequenceClassification if classification else transformers.MPNetModel
    m = cls(cfg).eval()
    perturb_norms(m)
    with torch.no_grad():   # a bias table large enough that a wrong bucket, sign or scaling shows
        m.base_model.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
        if classification:
            m.classifier.out_proj.weight.normal_(0.0, 0.5)
    return m


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    m = _hf()
    folder = tmp_path_factory.mktemp("mpnet")
    m.save_pretrained(folder)
    return m, folder


@pytest.fixture(scope="module")
def hf_classifier_folder(tmp_path_factory):
    m = _hf(classification=True)
    folder = tmp_path_factory.mktemp("mpnet-cls")
    m.save_pretrained(folder)
    return m, folder


def _inputs(m, lengths):
    lo, hi = preset("mpnet-base").regular_id_range()
    return ragged_ids(lengths, (lo, min(hi, m.config.vocab_size - 1)), m.config.pad_token_id)


# -- the bucket function and the table -----------------------------------------------------------------------

def test_buckets_equal_transformers_at_every_distance_to_600():
    rel = torch.arange(-600, 601)
    assert torch.equal(RelativeBuckets(32, 128).buckets(rel), MPNetEncoder.relative_position_bucket(rel))
    # and in the [L, L] layout transformers builds (memory - context = key - query)
    pos = torch.arange(300)
    rel2 = pos[None, :] - pos[:, None]
    assert torch.equal(RelativeBuckets().buckets(rel2), MPNetEncoder.relative_position_bucket(rel2))


def test_bias_table_reproduces_compute_position_bias_beyond_max_distance(hf_folder):
    """Our [H, 2R+1] table read at clamp(j - i, -R, R) equals transformers' [1, H, L, L] position bias
    for L = 600: every distance past R = 128 has the last bucket's value."""
    hf, folder = hf_folder
    enc = packformer.load(folder, fast=False).encoder
    table = enc.bias_table()                                                              # [H, 2R+1]
    r = (table.shape[1] - 1) // 2
    assert r == 128 and table.dtype == torch.float32
    x = torch.zeros(1, 600, TINY["hidden_size"])
    ref = hf.encoder.compute_position_bias(x)[0]                                          # [H, L, L]
    pos = torch.arange(600)
    ours = table[:, (pos[None, :] - pos[:, None]).clamp(-r, r) + r]
    assert torch.equal(ours, ref)


# -- transformers parity -------------------------------------------------------------------------------------

def test_hidden_states_match_transformers_across_bucket_edges(hf_folder):
    hf, folder = hf_folder
    lengths = edge_lengths()
    ids, mask, seqs = _inputs(hf, lengths)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    print(f"mpnet hidden states, max abs error vs transformers: {errs}")


def test_a_pad_id_inside_a_sequence_is_numbered_as_transformers_numbers_it(hf_folder):
    """A literal "<pad>" in a text is the pad id: transformers gives it the padding position and does not
    count it in the positions after it (create_position_ids_from_input_ids); so does packformer."""
    hf, folder = hf_folder
    lengths = [9, 40, 12]
    ids, mask, seqs = _inputs(hf, lengths)
    pad = hf.config.pad_token_id
    seqs[0][3] = seqs[1][5] = seqs[1][6] = pad                 # inside the texts, attended to like any token
    ids[0, 3] = ids[1, 5] = ids[1, 6] = pad
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    check_hidden_states(folder, ref, seqs, atol=1e-4)


def test_padded_drop_in_matches_transformers(hf_folder):
    hf, folder = hf_folder
    lengths = [3, 17, 130]
    ids, mask, _ = _inputs(hf, lengths)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = packformer.load(folder)(ids)
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    assert torch.count_nonzero(out[~mask.bool()]) == 0


@pytest.mark.parametrize("fast", [False, True])
def test_sequence_classification_logits_match_transformers(hf_classifier_folder, fast):
    hf, folder = hf_classifier_folder
    lengths = [1, 9, 17, 33, 65, 129, 200]
    ids, mask, seqs = _inputs(hf, lengths)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    m = packformer.load(folder, fast=fast)
    assert m.num_labels == 3 and m.config.labels() == ["neg", "neu", "pos"]
    logits = m.classify_batch(m.pack_ids(seqs))
    err = (logits - ref).abs().max().item()
    print(f"mpnet logits ({'fast' if fast else 'reference'}), max abs error vs transformers: {err:.3g}")
    assert err <= 1e-4
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_config_maps_mpnet_conventions(hf_folder):
    _, folder = hf_folder
    cfg = packformer.load(folder).config
    assert (cfg.family, cfg.model_type, cfg.type_vocab_size, cfg.position_offset) == ("mpnet", "mpnet", 0, 2)
    assert cfg.relative_bias == RelativeBuckets(32, 128) and cfg.max_tokens_per_sequence == TINY[
        "max_position_embeddings"] - 2
    assert cfg.architecture()["positions"] == "absolute (learned) + relative bias (32 buckets)"


# -- sentence-transformers -----------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "hello", "world"]


def _st_folder(root, hf) -> None:
    """An MPNet sentence-transformers folder: the HF model and a small MPNet WordPiece tokenizer at the
    top, mean pooling, Normalize, max_seq_length 150 (texts are cut past the last bucket edge)."""
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?", *WORDS,
             "##s", "##ing", "<mask>"]
    transformers.MPNetTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root)
    hf.save_pretrained(root)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_mean_tokens": True}))
    (root / "2_Normalize").mkdir()
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 150, "do_lower_case": False}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))


def test_sentence_transformers_folder_encodes_like_sentence_transformers(tmp_path, hf_folder):
    st_mod = pytest.importorskip("sentence_transformers")
    _st_folder(tmp_path, hf_folder[0])
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, n)) for n in (0, 1, 6, 7, 14, 30, 62, 63, 89, 126, 127, 300)]
    texts += ["Hello, World!", "   ", "CATS sitting?"]
    ref = st_mod.SentenceTransformer(str(tmp_path), device="cpu").encode(texts)
    for fast in (False, True):
        m = packformer.load(tmp_path, fast=fast)
        assert m.pooler.normalize and m.max_seq_length == 150
        assert max(len(s) for s in m.token_ids(texts)) == 150
        got = m.encode(texts)
        err = float(np.abs(got - ref).max())
        print(f"mpnet sentence-transformers ({'fast' if fast else 'reference'}), max abs error: {err:.3g}")
        assert err <= 1e-5


# -- batching, dtypes, int8 ----------------------------------------------------------------------------------

def test_alone_equals_batched_on_the_cpu_fast_path(hf_folder):
    hf, folder = hf_folder
    _, _, seqs = _inputs(hf, [5, 12, 13, 91, 130, 12])
    check_alone_equals_batched(folder, seqs, fast=True)


def test_bfloat16_and_int8_run(hf_folder):
    hf, folder = hf_folder
    lengths = [4, 23, 64, 129]
    _, _, seqs = _inputs(hf, lengths)
    fp32 = packformer.load(folder, fast=True)
    want = fp32.embed_batch(fp32.pack_ids(seqs))                                         # [B, H]
    bf16 = packformer.load(folder, dtype="bfloat16")
    h = run_packed(bf16, seqs)
    assert h.shape == (sum(lengths), TINY["hidden_size"]) and torch.isfinite(h).all()
    int8 = packformer.load(folder, quantize="int8")
    got = int8.embed_batch(int8.pack_ids(seqs))
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() >= 0.99, cos


# -- presets and the transformers peer -----------------------------------------------------------------------

def test_random_preset_and_its_transformers_peer_agree():
    m = packformer.load("random:mpnet-base", fast=False)
    cfg = m.config
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.max_position_embeddings) == \
        ("mpnet", 768, 12, 30527, 514)
    hf = to_hf(m.encoder, attn_implementation="eager")
    assert isinstance(hf, transformers.MPNetModel)
    lengths = [2, 131]
    ids, mask, seqs = ragged_ids(lengths, cfg.regular_id_range(), cfg.pad_token_id)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    got = run_packed(m, seqs)
    assert (got - ref).abs().max().item() <= 1e-4


def test_classifier_peer_reproduces_our_head():
    cfg = preset("mpnet-base", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                 max_position_embeddings=258, num_labels=3)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    head = family_of("mpnet").make_head(cfg).eval()
    with torch.no_grad():
        enc.relative_bias.weight.normal_(0.0, 1.0)
        head.out.weight.normal_(0.0, 0.5)
    hf = to_hf(enc, head, attn_implementation="eager", with_head=True)
    assert isinstance(hf, transformers.MPNetForSequenceClassification)
    parts = ModelParts(config=cfg, encoder=enc, head=head, pooler=Pooler(), tokenizer=None,
                       max_seq_length=cfg.max_tokens_per_sequence, source="test", format="random")
    m = Model(parts, fast=False)
    lengths = [2, 40, 150]
    ids, mask, seqs = ragged_ids(lengths, (4, 299), cfg.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(m.classify_batch(m.pack_ids(seqs)), ref, atol=1e-4, rtol=0)


# -- unsupported options -------------------------------------------------------------------------------------

def test_unsupported_config_options_fail_clearly(hf_folder):
    d = hf_folder[0].config.to_dict()
    with pytest.raises(ValueError, match="relative_attention_num_buckets 64"):
        family_of("mpnet").config_from_hf(dict(d, relative_attention_num_buckets=64))
    with pytest.raises(ValueError, match="hidden_act 'mish'"):
        family_of(d).config_from_hf(dict(d, hidden_act="mish"))
    with pytest.raises(ValueError, match="cannot reproduce"):
        to_hf(Encoder(preset("mpnet-base", num_layers=1, norm_first=True)), attn_implementation="eager")


# -- GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp16_fast_path_matches_the_cpu_reference(hf_classifier_folder):
    """fp16 CUDA fast path (Triton attention with the bias table) against the fp32 CPU reference."""
    hf, folder = hf_classifier_folder
    lengths = edge_lengths()
    _, _, seqs = _inputs(hf, lengths)
    ref_m = packformer.load(folder, device="cpu", fast=False)
    gpu_m = packformer.load(folder, device="cuda", dtype="float16", fast=True)
    ref = run_packed(ref_m, seqs)
    got = run_packed(gpu_m, seqs)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)                        # [T]
    assert cos.min().item() >= 0.9995, f"lowest per-token cosine {cos.min().item():.6f}"
    want = ref_m.classify_batch(ref_m.pack_ids(seqs))
    logits = gpu_m.classify_batch(gpu_m.pack_ids(seqs)).float().cpu()
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
