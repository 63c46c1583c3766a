"""XLM-R with 8,194 positions (bge-m3, snowflake-arctic-embed-l-v2.0): 8,192-token inputs run exactly, on
every path, without a quadratic [H, L, L] buffer.

The model is an ordinary "xlm-roberta" config (the bert family loads it); what these tests pin down is
the long-input behaviour: results equal to transformers for 6,000- and 8,192-token sequences packed with
short ones, peak memory far below what one [H, L, L] fp32 score matrix would take, and a clear error
one token past the maximum."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import packformer
from packformer.config import preset
from packformer.ops import attention
from packformer.ops.attention import AttentionMeta, PositionBias, varlen_attention, varlen_attention_ref

from .harness import check_hidden_states, perturb_norms, ragged_ids

transformers = pytest.importorskip("transformers")

MAX_POS = 8194
MAX_LEN = MAX_POS - 2                  # XLM-R numbers positions from pad_token_id + 1 = 2
HEADS = 4
VOCAB = (4, 999)                       # <s> <pad> </s> <unk> at 0-3, <mask> last
# one [H, L, L] fp32 score matrix at the longest length: what an unchunked attention would hold
SCORES_BYTES = HEADS * MAX_LEN * MAX_LEN * 4


def hf_config(**changes):
    kw = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128,
              max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    kw.update(changes)
    return transformers.XLMRobertaConfig(**kw)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """(transformers XLMRobertaModel with SDPA attention, its save_pretrained folder)."""
    torch.manual_seed(0)
    hf = transformers.XLMRobertaModel(hf_config(attn_implementation="sdpa"), add_pooling_layer=False).eval()
    assert hf.config._attn_implementation == "sdpa"
    perturb_norms(hf)
    folder = tmp_path_factory.mktemp("xlmr8194")
    hf.save_pretrained(folder)
    return hf, folder


def hf_packed(hf, seqs) -> torch.Tensor:
    """transformers on each sequence alone (no padding, so no mask: SDPA's own kernel at 8,192 tokens), the
    rows concatenated as packformer packs them: [T, H]."""
    with torch.no_grad():
        return torch.cat([hf(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs])


def test_preset_has_xlmr_large_shape_and_8192_tokens():
    c, large = preset("xlmr-large-8194"), preset("xlmr-large")
    assert c.max_position_embeddings == MAX_POS and c.max_tokens_per_sequence == MAX_LEN
    assert c.replace(max_position_embeddings=514) == large


def test_config_maps_to_the_bert_family_with_8192_tokens(long_model):
    _, folder = long_model
    m = packformer.load(folder)          # the default token budget holds one sequence of the maximum length
    assert (m.config.family, m.config.model_type, m.max_seq_length) == ("bert", "xlm-roberta", MAX_LEN)
    assert m.max_batch_tokens >= MAX_LEN


def test_6000_and_8192_tokens_packed_with_short_ones_equal_transformers(long_model):
    hf, folder = long_model
    lengths = [5, 6000, 1, MAX_LEN, 17, 300]
    _, _, seqs = ragged_ids(lengths, VOCAB, pad_id=1)
    ref = hf_packed(hf, seqs)
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    assert set(errs) == {"reference", "fast"}


def test_one_token_past_the_maximum_is_refused_naming_it(long_model):
    _, folder = long_model
    m = packformer.load(folder)
    too_long = f"input 1 has {MAX_LEN + 1} tokens, more than the model's maximum of {MAX_LEN}"
    with pytest.raises(ValueError, match=too_long):
        m.pack_ids([[5] * 3, [5] * (MAX_LEN + 1)])
    with pytest.raises(ValueError, match=f"maximum of {MAX_LEN}"):
        m(torch.full((1, MAX_LEN + 1), 5))
    assert m.pack_ids([[5] * MAX_LEN]).num_tokens == MAX_LEN


# Run in a fresh process (pytest's own heap and earlier tests would blur the figure).
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def peak_growth(fn):
        # VmHWM (peak RSS) after the call minus VmRSS before it: the call's own peak, or more. The peak is
        # reset first where the kernel allows it (clear_refs 5), so earlier peaks do not count.
        try:
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before
""")

_MODEL_PEAK = _MEASURE + textwrap.dedent("""
    import packformer

    folder, n = sys.argv[1], int(sys.argv[2])
    ids = torch.randint(4, 999, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    for path in ("fast", "reference"):
        m = packformer.load(folder, fast=path == "fast")
        batch = m.pack_ids([ids])
        m.hidden_states(m.pack_ids([ids[:64]]))          # first-call allocations out of the way
        out[path] = peak_growth(lambda: m.hidden_states(batch))
    print(json.dumps(out))
""")


def run_measure(script: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_of_one_8192_token_sequence_is_far_below_one_score_matrix(long_model):
    """Peak RSS growth of a whole forward (2 layers) at 8,192 tokens, in a fresh process: torch's CPU
    SDPA (the flash kernel, fp32) never materialises the [H, L, L] scores that the grouped attention of
    both paths would otherwise hold (4 x 8192 x 8192 fp32 = 1 GiB)."""
    _, folder = long_model
    growth = run_measure(_MODEL_PEAK, folder, MAX_LEN)
    for path, grew in growth.items():
        assert grew < SCORES_BYTES / 8, f"{path}: peak RSS grew {grew / 2**20:.0f} MiB at {MAX_LEN} tokens"


def _qkv(lengths, heads=HEADS, dim=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), heads, dim, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, cu


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "table_and_window"])
def test_reference_attention_in_query_chunks_equals_one_chunk(monkeypatch, with_bias):
    """Chunking the queries changes no result: each chunk's softmax spans all of its sequence's keys (and
    the relative positions of a chunk's rows are those of the whole sequence), on every chunk edge. Only
    the GEMMs' summation order may change with the chunk's row count (one row takes a GEMV kernel)."""
    lengths = [37, 100, 1, 64]
    q, k, v, cu = _qkv(lengths)
    bias = None
    if with_bias:
        table = torch.randn(HEADS, 2 * 8 + 1, generator=torch.Generator().manual_seed(1))
        bias = PositionBias(table=table, window=20)
    whole = varlen_attention_ref(q, k, v, cu, bias=bias)                   # every sequence in one chunk
    for rows in (1, 7, 33):                                                # chunks of 1, 7 and 33 queries (L=100)
        monkeypatch.setattr(attention, "REF_SCORE_ELEMENTS", rows * HEADS * 100)
        err = (varlen_attention_ref(q, k, v, cu, bias=bias) - whole).abs().max().item()
        assert err <= 1e-6, f"{rows}-query chunks: {err:.3g}"
    meta = AttentionMeta.build(cu, max(lengths))
    assert (whole - varlen_attention(q, k, v, meta, bias=bias)).abs().max() <= 1e-5


_REF_PEAK = _MEASURE + textwrap.dedent("""
    from packformer.ops.attention import AttentionMeta, varlen_attention, varlen_attention_ref

    n, heads = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n + 5, heads, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0, n, n + 5], dtype=torch.int32)
    varlen_attention_ref(q[:8], k[:8], v[:8], torch.tensor([0, 8], dtype=torch.int32))
    out = {}
    grew = peak_growth(lambda: out.setdefault("ref", varlen_attention_ref(q, k, v, cu)))
    err = (out["ref"] - varlen_attention(q, k, v, AttentionMeta.build(cu, n))).abs().max().item()
    print(json.dumps({"growth": grew, "err": err}))
""")


def test_reference_attention_on_8192_tokens_is_exact_and_holds_no_score_matrix():
    """varlen_attention_ref (the readable reference that flash_varlen is tested against) on one 8,192-token
    sequence: equal to torch's SDPA, and its peak RSS growth far below one [H, L, L] fp32 matrix."""
    got = run_measure(_REF_PEAK, MAX_LEN, HEADS)
    assert got["err"] <= 1e-5
    assert got["growth"] < SCORES_BYTES / 4, f"peak RSS grew {got['growth'] / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_flash_varlen_on_8192_tokens_in_fp16_matches_the_chunked_reference():
    """Our Triton kernel (the CUDA path of every family with a position bias or window) on one 8,192-token
    sequence packed with short ones, plain and with an MPNet-style table and a window, in fp16."""
    from packformer.ops.flash_varlen import flash_varlen

    lengths = [3, MAX_LEN, 1, 200]
    torch.cuda.reset_peak_memory_stats()
    q, k, v, cu = _qkv(lengths, device="cuda", dtype=torch.float16)
    table = torch.randn(HEADS, 2 * 128 + 1, generator=torch.Generator().manual_seed(1)).cuda()
    for bias_table, window in ((None, 0), (table, 0), (None, 64)):
        got = flash_varlen(q, k, v, cu, max(lengths), bias_table=bias_table, window=window)
        bias = PositionBias(bias_table, window) if bias_table is not None or window else None
        want = varlen_attention_ref(q, k, v, cu, bias=bias)
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(1), want.float().flatten(1), dim=1)
        assert cos.min().item() >= 0.9995, f"table={bias_table is not None} window={window}: {cos.min().item():.5f}"
    assert torch.cuda.max_memory_allocated() < SCORES_BYTES    # neither side held a [H, L, L] matrix


@pytest.mark.gpu
def test_cuda_fp16_fast_path_on_8192_tokens_matches_the_fp32_cpu_reference(long_model):
    _, folder = long_model
    lengths = [MAX_LEN, 6000, 5, 1, 300]
    _, _, seqs = ragged_ids(lengths, VOCAB, pad_id=1, seed=4)
    ref = packformer.load(folder, device="cpu", fast=False)
    gpu = packformer.load(folder, device="cuda", dtype="float16")
    with torch.inference_mode():
        want = ref.hidden_states(ref.pack_ids(seqs)).float()
        for batch_seqs, rows in ((seqs, slice(None)), ([seqs[0]], slice(0, MAX_LEN))):   # packed, then alone
            got = gpu.hidden_states(gpu.pack_ids(batch_seqs)).float().cpu()
            cos = torch.nn.functional.cosine_similarity(got, want[rows], dim=1).min().item()
            assert cos >= 0.9995, f"{len(batch_seqs)} sequences: min cosine per token {cos:.5f}"
