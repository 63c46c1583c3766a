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
from packformer.fast import cpu_linear
from packformer.fast.cpu_features import CpuFeatures, apply_caps, detect, parse_cpuinfo
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


def test_the_fused_onednn_linears_run_where_torch_has_them(fast):
    assert fast.runner.linear_backend == ("OneDnnLinear" if cpu_linear.onednn_available(torch.float32)
                                          else "AtenLinear")


def test_without_onednn_ops_the_addmm_fallback_matches_the_reference(fast, reference, monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda dtype: False)
    runner = build_runner(fast)
    assert runner.linear_backend == "AtenLinear"
    batch = fast.tokenize(TEXTS[:6])
    assert (runner(batch, _meta(batch)) - reference.hidden_states(batch)).abs().max() <= 1e-5


@pytest.mark.parametrize("k, n", [(384, 1152), (1536, 384), (3072, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_onednn_linear_row_is_the_same_at_every_row_count(k, n, dtype):
    # one row alone (a matrix-vector kernel in oneDNN) must sum like the GEMM kernel of any other count
    if not cpu_linear.onednn_available(dtype):
        pytest.skip(f"this torch build has no fused oneDNN linear for {dtype}: the addmm fallback runs")
    g = torch.Generator().manual_seed(k)
    lin = torch.nn.Linear(k, n)
    x, r = torch.randn(1031, k, generator=g).to(dtype), torch.randn(1031, n, generator=g).to(dtype)
    f = cpu_linear.OneDnnLinear(lin, dtype)
    with torch.inference_mode():
        for call in (lambda a, b: f(a), lambda a, b: f(a, act="gelu"), lambda a, b: f(a, residual=b)):
            whole = call(x, r)
            for m in (1, 2, 3, 17, 512):
                assert torch.equal(call(x[:m], r[:m]), whole[:m]), m


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("f", [40, 48, 96, 1152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_activation_row_is_the_same_bits_at_every_row_count(act, f, dtype):
    """Above ATen's grain size its elementwise kernels split the buffer between threads and end each share
    with a scalar loop that rounds otherwise: act_ must not let a row's bits depend on the rows around it."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(701, f, generator=g) * 3).to(dtype)          # 701 x f: well over 32,768 elements
    whole = cpu_linear.act_(x.clone(), act)
    for r in (0, 1, 350, 699, 700):
        for rows in (x[r:r + 1], x[max(0, r - 3):r + 1]):
            alone = cpu_linear.act_(rows.clone(), act)[-1]
            assert torch.equal(alone, whole[r]), (act, f, dtype, r, rows.shape)
    assert torch.allclose(whole.float(), getattr(torch.nn.functional, act if act != "gelu_tanh" else "gelu")(
        x.float(), **({"approximate": "tanh"} if act == "gelu_tanh" else {})), atol=2e-2 if dtype != torch.float32 else 1e-6)


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

def _lengths_summing_to(total, seed):
    """Sequence lengths in [2, 300] (one of 300, to cross block edges) that add up to `total` exactly."""
    g = np.random.default_rng(seed)
    lens = [300]
    while sum(lens) < total - 302:
        lens.append(int(g.integers(2, 300)))
    rest = total - sum(lens)
    return lens + ([rest] if rest <= 300 else [rest // 2, rest - rest // 2])


MODES = {"fp32": {}, "bf16": dict(dtype="bfloat16"), "int8": dict(quantize="int8")}


@pytest.mark.parametrize("mode", MODES, ids=MODES)
def test_every_sequence_is_bit_identical_alone_and_in_a_batch_of_many_row_blocks(minilm_dir, mode):
    # 5,121 tokens: far over one row block (FFN blocks of 1,024 rows above 4,096 tokens, int8 blocks of
    # 512), ending in a one-row block; sequences cross block edges. Not "close": the same bits, on any ISA.
    from packformer.fast.cpu import BLOCK_ABOVE
    m = packformer.load(minilm_dir, **MODES[mode])
    lens = _lengths_summing_to(5 * 1024 + 1, seed=1)
    g = np.random.default_rng(2)
    ids = [[101] + g.integers(1000, 30000, size=n - 2).tolist() + [102] for n in lens]
    batch = pack(ids)
    assert batch.num_tokens == 5121 > BLOCK_ABOVE
    together = m.hidden_states(batch)
    cu = batch.cu_seqlens.tolist()
    for i in [0, 1, 2, len(ids) // 2, len(ids) - 2, len(ids) - 1] + [int(np.argmin(lens))]:
        alone = m.hidden_states(pack([ids[i]]))
        assert torch.equal(together[cu[i]:cu[i + 1]], alone), (mode, i, lens[i])


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
    f = parse_cpuinfo(CPUINFO, env={})
    assert f.avx512_f and f.avx512_bf16 and f.amx_bf16 and f.amx_int8 and not f.avx_vnni
    assert f.physical_cores == 1            # two hyper-threads of one core
    assert f.bf16_native and f.bf16_fast and f.int8_native


def test_no_bf16_hardware_means_not_native():
    f = parse_cpuinfo("processor : 0\nflags : fpu avx2\n", env={})
    assert not f.bf16_native and not f.bf16_fast and not f.int8_native and f.isa == "avx2"


def test_isa_caps_hide_what_the_kernels_may_not_use():
    every = CPUINFO.replace("amx_int8", "amx_int8 avx_vnni")
    assert parse_cpuinfo(every, env={}).isa == "amx" and parse_cpuinfo(every, env={}).cap == ""
    avx2 = parse_cpuinfo(every, env={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert avx2.isa == "avx2" and not (avx2.int8_native or avx2.bf16_native or avx2.avx512_f)
    assert avx2.cap == "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
    vnni = parse_cpuinfo(every, env={"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"})
    assert vnni.isa == "avx512_vnni" and vnni.int8_native and not vnni.bf16_native and not vnni.amx_tile
    core = parse_cpuinfo(every, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert core.isa == "avx512" and not core.int8_native
    assert parse_cpuinfo(every, env={"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}).isa == "avx2_vnni"
    # a cap never adds what the CPU lacks; an unknown value is ignored, as oneDNN ignores it
    assert apply_caps({"avx512_f": False}, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}) == ({"avx512_f": False}, "")
    assert apply_caps({"avx512_f": True}, {"ONEDNN_MAX_CPU_ISA": "AVX9000"}) == ({"avx512_f": True}, "")


def test_detect_follows_the_caps_of_its_environment():
    code = ("from packformer.fast.cpu_features import detect; f = detect(); "
            "print(f.isa, f.int8_native, f.bf16_native, f.cap)")
    import subprocess
    import sys
    env = dict(__import__("os").environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["avx2", "False", "False", "ONEDNN_MAX_CPU_ISA=AVX2", "ATEN_CPU_CAPABILITY=avx2"]


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
