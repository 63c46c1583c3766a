"""The CPU fast path: the same numbers as the reference encoder (fp32 within 1e-5 on all-MiniLM-L6-v2),
whatever the batch's order or neighbours, with bf16 and int8 as opt-in modes of stated accuracy, and
clear errors for options it does not take."""
import numpy as np
import pytest
import torch

import packformer
from packformer.batch import pack
from packformer.config import preset
from packformer.fast.cpu import CpuPathOptions, CpuRunner, build_runner
from packformer.fast.cpu_features import CpuFeatures, detect, parse_cpuinfo
from packformer.fast.cpu_threads import ENV_THREADS, apply_threads, resolve_threads
from packformer.model import Encoder
from packformer.ops.attention import AttentionMeta

TEXTS = ["Hello world", "How are you!", "The quick brown fox jumps over the lazy dog. " * 3,
         "packed batches never pad", "x", "Über naïve café — unicode ✓", "another " * 40, "Hello world",
         "How are you!", "short one", "a b c d e f g h i j k l m n o p", "the end"]


def _meta(batch):
    return AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen)


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return packformer.load(minilm_dir, fast=False)


@pytest.fixture(scope="module")
def fast(minilm_dir):
    return packformer.load(minilm_dir)


@pytest.fixture(scope="module")
def ref_embeddings(reference):
    return reference.encode(TEXTS)


# ---- selection and parity ------------------------------------------------------------------------

def test_cpu_models_run_the_fast_runner_and_fast_false_the_reference(fast, reference):
    assert isinstance(fast.runner, CpuRunner)
    assert reference.runner is reference.encoder


def test_fp32_hidden_states_match_the_reference_within_1e5_in_any_batch_order(fast, reference):
    # TEXTS repeats lengths at non-adjacent places: the runner reorders by length and puts rows back
    batch = fast.tokenize(TEXTS)
    got, want = fast.hidden_states(batch), reference.hidden_states(batch)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5


def test_batches_over_one_block_of_rows_match_the_reference(fast, reference):
    # more tokens than BLOCK_ABOVE: the FFN runs block by block and QKV fills one buffer per forward
    from packformer.fast.cpu import BLOCK_ABOVE, BLOCK_ROWS
    g = np.random.default_rng(3)
    ids = [[101] + g.integers(1000, 30000, size=int(n)).tolist() + [102] for n in g.integers(5, 150, size=80)]
    batch = pack(ids)
    assert batch.num_tokens > BLOCK_ABOVE and batch.num_tokens % BLOCK_ROWS
    got, want = fast.hidden_states(batch), reference.hidden_states(batch)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("linear", ["onednn", "aten"])
def test_both_linear_backends_match_the_reference(fast, reference, linear):
    runner = build_runner(fast, linear=linear)
    batch = fast.tokenize(TEXTS[:6])
    assert (runner(batch, _meta(batch)) - reference.hidden_states(batch)).abs().max() <= 1e-5


def test_encode_matches_sentence_transformers_within_1e5(fast, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.abs(fast.encode(TEXTS) - ref).max() <= 1e-5


def test_a_text_gets_the_same_embedding_alone_and_in_any_batch(fast):
    together = fast.encode(TEXTS)
    for i in (0, 2, 6):
        assert np.abs(fast.encode([TEXTS[i]])[0] - together[i]).max() <= 1e-5
    shuffled = [TEXTS[i] for i in reversed(range(len(TEXTS)))]
    assert np.abs(fast.encode(shuffled)[::-1] - together).max() <= 1e-5


def test_empty_sequences_and_token_types_are_handled_like_the_reference(fast, reference):
    ids = fast.token_ids(["one two three", "four", "one two three"])
    batch = pack([ids[0], [], ids[1], ids[2]], token_types=[[0] * len(ids[0]), [], [1] * len(ids[1]),
                                                             [0, 1] + [1] * (len(ids[2]) - 2)])
    got = fast.runner(batch, _meta(batch))
    want = reference.encoder(batch, _meta(batch))
    assert got.shape == (batch.num_tokens, 384)
    assert (got - want).abs().max() <= 1e-5


def test_an_empty_batch_gives_no_rows(fast):
    batch = pack([])
    assert fast.runner(batch, _meta(batch)).shape == (0, 384)


CONFIGS = {
    "pre-norm, final norm, relu": dict(norm_first=True, final_layer_norm=True, activation="relu"),
    "post-norm, gelu_tanh, no token types": dict(activation="gelu_tanh", type_vocab_size=0),
    "roberta-style positions": dict(pad_token_id=1, position_offset=2, layer_norm_eps=1e-5),
}


@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_other_encoder_shapes_match_the_reference(changes):
    cfg = preset("minilm-l6", num_layers=2, vocab_size=1000, **changes)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batch = pack([torch.randint(4, 1000, (n,), generator=g).tolist() for n in (9, 3, 9, 17)],
                 position_offset=cfg.position_offset)
    with torch.inference_mode():
        want = enc(batch, _meta(batch))
    got = CpuRunner(enc, CpuPathOptions())(batch, _meta(batch))
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.slow
def test_random_bert_base_matches_the_reference_within_1e4():
    ref = packformer.load("random:bert-base", fast=False)
    fast = packformer.load("random:bert-base")
    batch = fast.tokenize(TEXTS)
    assert (fast.hidden_states(batch) - ref.hidden_states(batch)).abs().max() <= 1e-4


# ---- bf16 and int8 modes -------------------------------------------------------------------------

def test_bf16_embeddings_keep_cosine_0999_with_fp32(minilm_dir, ref_embeddings):
    m = packformer.load(minilm_dir, dtype="bfloat16")
    assert m.runner.dtype == torch.bfloat16
    assert _cos(m.encode(TEXTS), ref_embeddings).min() >= 0.999


# int8: tests/fast/test_quant.py


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize="int4"), "unsupported quantize='int4'"),
    (dict(quantize="int8", fast=False), "CPU fast path"),
    (dict(quantize="int8", dtype="bfloat16"), "quantizes the fp32 weights"),
    (dict(threads=0), "threads must be a positive integer"),
])
def test_bad_options_raise_clear_errors(minilm_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        packformer.load(minilm_dir, **kwargs)


# ---- CPU features and threads --------------------------------------------------------------------

CPUINFO = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
"""


def test_cpuinfo_flags_and_cores_are_parsed():
    f = parse_cpuinfo(CPUINFO)
    assert f.avx512_f and f.avx512_bf16 and f.amx_bf16 and f.amx_int8 and not f.avx_vnni
    assert f.physical_cores == 1            # two hyper-threads of one core
    assert f.bf16_native and f.bf16_fast and f.int8_native


def test_no_bf16_hardware_means_not_native():
    f = parse_cpuinfo("processor : 0\nflags : fpu avx2\n")
    assert not f.bf16_native and not f.bf16_fast and not f.int8_native


def test_detect_reports_at_least_one_core_and_is_cached():
    f = detect()
    assert isinstance(f, CpuFeatures) and f.physical_cores >= 1 and detect() is f


def test_threads_come_from_the_argument_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv(ENV_THREADS, raising=False)
    assert resolve_threads(None) == detect().physical_cores
    monkeypatch.setenv(ENV_THREADS, "3")
    assert resolve_threads(None) == 3
    assert resolve_threads(1) == 1
    monkeypatch.setenv(ENV_THREADS, "many")
    with pytest.raises(ValueError, match=ENV_THREADS):
        resolve_threads(None)


def test_apply_threads_sets_torch_intra_op_threads():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
