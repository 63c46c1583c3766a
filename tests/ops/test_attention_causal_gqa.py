"""Causal masks and grouped-query attention (decoder-style encoders: Qwen3, Gemma 3) on packed sequences:
the reference against a plain per-sequence softmax, the CPU SDPA path and the Triton kernel (interpreter,
GPU) against the reference, and a sequence's result independent of its neighbours."""
import pytest
import torch

from packformer.ops.attention import AttentionMeta, PositionBias, split_qkv, varlen_attention, varlen_attention_ref
from packformer.ops.flash_varlen import flash_varlen

LENS = [1, 9, 70, 0, 16, 23, 9]


def _qkv(lens, heads=4, kv_heads=2, dim=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim, generator=g).to(device, dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return split_qkv(qkv, heads, kv_heads, dim), cu


def _plain(q, k, v, cu, scale, causal=False, window=0):
    """Per sequence: kv heads repeated, a [H, L, L] score matrix masked by hand."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(group, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale                                    # [H, L, L]
        i = torch.arange(e - s)
        rel = i[None, :] - i[:, None]
        if causal:
            scores = scores.masked_fill(rel > 0, float("-inf"))
        if window:
            scores = scores.masked_fill(rel.abs() > window, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def test_split_qkv_views_rows_as_q_then_k_then_v_with_fewer_kv_heads():
    qkv = torch.arange(2 * (4 + 2 * 2) * 3, dtype=torch.float32).view(2, -1)
    q, k, v = split_qkv(qkv, 4, 2, 3)
    assert q.shape == (2, 4, 3) and k.shape == v.shape == (2, 2, 3)
    assert torch.equal(q.reshape(2, -1), qkv[:, :12]) and torch.equal(k.reshape(2, -1), qkv[:, 12:18])
    assert torch.equal(v.reshape(2, -1), qkv[:, 18:]) and q.data_ptr() == qkv.data_ptr()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(True, 0), (False, 5), (True, 5), (False, 0)])
def test_reference_is_a_masked_softmax_per_sequence_with_shared_kv_heads(kv_heads, causal, window):
    (q, k, v), cu = _qkv(LENS, kv_heads=kv_heads)
    bias = PositionBias(window=window, causal=causal) if causal or window else None
    got = varlen_attention_ref(q, k, v, cu, scale=0.3, bias=bias)
    assert (got - _plain(q, k, v, cu, 0.3, causal, window)).abs().max() < 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(True, 0), (True, 5), (False, 5)])
def test_cpu_sdpa_path_equals_the_reference(kv_heads, causal, window):
    (q, k, v), cu = _qkv(LENS, kv_heads=kv_heads)
    meta = AttentionMeta.build(cu, max(LENS))
    bias = PositionBias(window=window, causal=causal)
    got = varlen_attention(q, k, v, meta, scale=0.3, bias=bias)
    assert (got - varlen_attention_ref(q, k, v, cu, scale=0.3, bias=bias)).abs().max() < 1e-5


def test_causal_first_token_sees_only_itself_and_later_tokens_do_not_change_earlier_ones():
    (q, k, v), cu = _qkv([12], kv_heads=1)
    meta = AttentionMeta.build(cu, 12)
    full = varlen_attention(q, k, v, meta, bias=PositionBias(causal=True))
    assert torch.allclose(full[0], v[0].expand_as(full[0]), atol=1e-6)
    (q2, k2, v2) = (t[:7] for t in (q, k, v))
    head = varlen_attention(q2, k2, v2, AttentionMeta.build(cu.new_tensor([0, 7]), 7), bias=PositionBias(causal=True))
    assert torch.allclose(head, full[:7], atol=1e-6)


def test_cpu_causal_gqa_sequence_gives_the_same_bits_alone_and_batched():
    (q, k, v), cu = _qkv(LENS, kv_heads=2)
    bias = PositionBias(causal=True)
    together = varlen_attention(q, k, v, AttentionMeta.build(cu, max(LENS)), bias=bias)
    start = 0
    for n in LENS:
        if n:
            sl = slice(start, start + n)
            alone = varlen_attention(q[sl], k[sl], v[sl], AttentionMeta.build(cu.new_tensor([0, n]), n), bias=bias)
            assert torch.equal(alone, together[sl]), n
        start += n


def test_kv_heads_must_divide_the_query_heads():
    (q, k, v), cu = _qkv([4], heads=4, kv_heads=2)
    meta = AttentionMeta.build(cu, 4)
    with pytest.raises(ValueError, match="Hkv"):
        varlen_attention(q[:, :3], k, v, meta)
    with pytest.raises(ValueError, match="causal"):
        PositionBias(causal=1)


def test_launcher_without_a_kernel_runs_the_causal_gqa_reference():
    (q, k, v), cu = _qkv(LENS, kv_heads=2)
    got = flash_varlen(q, k, v, cu, max(LENS), scale=0.3, causal=True, window=5)
    assert (got - _plain(q, k, v, cu, 0.3, True, 5)).abs().max() < 1e-5


def test_kernel_causal_and_gqa_under_triton_interpreter(run_interpreted):
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel's key loop")
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.attention import PositionBias, split_qkv, varlen_attention_ref
        from packformer.ops.flash_varlen import FlashConfig, flash_varlen, tile_table
        assert _triton.INTERPRET
        g = torch.Generator().manual_seed(0)
        # 32-row query blocks over 16-key blocks: the 70-token sequence has blocks above the diagonal
        # (skipped), on it (masked) and a ragged last one
        lens = [1, 9, 70, 0, 16, 23]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        cfg = FlashConfig(32, 16, 4, 1)
        modes = {"tiles": (torch.from_numpy(tile_table(lens, cfg.block_m)), False), "self-indexed": (None, False),
                 "dense": (None, True)}
        for heads, kv in ((4, 2), (3, 1)):
            qkv = torch.randn(sum(lens), (heads + 2 * kv) * 16, generator=g)
            q, k, v = split_qkv(qkv, heads, kv, 16)                                  # strided views
            for causal, window in ((True, 0), (True, 5), (False, 5)):
                bias = PositionBias(window=window, causal=causal)
                want = varlen_attention_ref(q, k, v, cu, scale=0.3, bias=bias)
                for mode, (tiles, dense) in modes.items():
                    out = torch.full_like(q, float("nan"))
                    got = flash_varlen(q, k, v, cu, max(lens), scale=0.3, out=out, config=cfg, tiles=tiles,
                                       dense=dense, window=window, causal=causal)
                    err = (got - want).abs().max().item()
                    assert got is out and torch.isfinite(got).all() and err < 1e-5, (heads, kv, causal, window, mode, err)
        print("ok")
    """)


# ---- on a GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 8, 128), (3, 1, 256), (4, 4, 64)])
@pytest.mark.parametrize("causal,window", [(True, 0), (False, 256), (False, 0)])
def test_gpu_causal_gqa_matches_the_fp32_reference(dtype, heads, kv_heads, dim, causal, window):
    lens = [1, 7, 64, 130, 600, 96, 0, 33]
    (q, k, v), cu = _qkv(lens, heads, kv_heads, dim, dtype=dtype, device="cuda")
    bias = PositionBias(window=window, causal=causal)
    want = varlen_attention_ref(*(t.float() for t in (q, k, v)), cu, scale=dim ** -0.5, bias=bias)
    got = flash_varlen(q, k, v, cu, max(lens), window=window, causal=causal)
    assert (got.float() - want).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)
    via_dispatch = varlen_attention(q, k, v, AttentionMeta.build(cu, max(lens)), bias=bias)
    assert (via_dispatch.float() - want).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)
