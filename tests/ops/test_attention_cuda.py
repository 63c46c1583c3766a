"""The CUDA branch of varlen attention: flash attention on packed [T, H, D] views (GPU only); with a
PositionBias, our Triton flash_varlen (torch's varlen and nested kernels take no bias)."""
import pytest
import torch

from packformer.ops.attention import AttentionMeta, PositionBias, varlen_attention, varlen_attention_ref

pytestmark = pytest.mark.gpu


def _packed(lens, heads=12, dim=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    qkv = torch.randn(t, 3, heads, dim, generator=g).to("cuda", dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    return qkv, AttentionMeta.build(cu, max(lens), list(lens))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64])
def test_matches_the_per_sequence_reference_on_strided_qkv_views(dtype, dim):
    qkv, meta = _packed([1, 7, 130, 512, 64], dim=dim, dtype=dtype)
    q, k, v = qkv.unbind(1)                       # views with row stride 3*H*D, as the encoder passes them
    got = varlen_attention(q, k, v, meta)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens)
    assert got.shape == q.shape and torch.isfinite(got).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (got.float() - want.float()).abs().max() <= tol


def test_a_sequence_is_unaffected_by_its_neighbours():
    qkv, meta = _packed([40, 100, 25])
    q, k, v = qkv.unbind(1)
    both = varlen_attention(q, k, v, meta)
    alone_meta = AttentionMeta.build(torch.tensor([0, 100], dtype=torch.int32, device="cuda"), 100, [100])
    alone = varlen_attention(q[40:140], k[40:140], v[40:140], alone_meta)
    assert torch.equal(both[40:140], alone)


def test_empty_segments_are_allowed_and_capturable_in_a_cuda_graph():
    qkv, _ = _packed([30, 50, 20])
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 30, 80, 100, 100, 100], dtype=torch.int32, device="cuda")   # two empty segments
    meta = AttentionMeta(cu_seqlens=cu, max_seqlen=128, seqlens=[30, 50, 20, 0, 0])
    want = varlen_attention(q, k, v, meta)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        varlen_attention(q, k, v, meta)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = varlen_attention(q, k, v, meta)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["bias", "window", "both"])
def test_a_position_bias_goes_to_flash_varlen_and_matches_the_reference(kind, dtype):
    qkv, meta = _packed([1, 7, 63, 64, 65, 129, 130, 512, 1024, 200], dtype=dtype)
    q, k, v = qkv.unbind(1)
    table = torch.randn(12, 2 * 128 + 1, device="cuda") if kind != "window" else None
    bias = PositionBias(table, 64 if kind != "bias" else 0)
    got = varlen_attention(q, k, v, meta, bias=bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 5e-3}[dtype]   # fp32: tf32 dot products
    assert (got.float() - want.float()).abs().max() <= tol


def test_an_empty_position_bias_keeps_the_plain_path():
    qkv, meta = _packed([40, 100, 25])
    q, k, v = qkv.unbind(1)
    assert torch.equal(varlen_attention(q, k, v, meta, bias=PositionBias()), varlen_attention(q, k, v, meta))
