"""DeBERTa's disentangled attention kernel (ops/disentangled_flash.py): equal to the readable reference
(ops/disentangled.py, itself checked against transformers) on packed sequences whose lengths straddle the
bucket edges, from the host tile table and from the dense grid a CUDA graph captures; a sequence's output
does not depend on its neighbours; half precision stays as close to the exact result as the reference in
that precision does."""
from __future__ import annotations

import pytest
import torch

from packformer.ops.disentangled import DisentangledConfig, disentangled_attention_ref
from packformer.ops.disentangled_flash import aligned_rows, disentangled_flash, reachable_rows

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_reachable_rows_cover_every_distance_of_the_longest_sequence():
    cfg = DisentangledConfig(8, 32, ("c2p", "p2c"))
    for n in (1, 2, 5, 40, 300):
        lo, hi = reachable_rows(cfg, n)
        pos = torch.arange(n)
        from packformer.ops.disentangled import distance_index
        r = distance_index(cfg, n)
        c = (r.shape[0] - 1) // 2
        used = r[pos[:, None] - pos[None, :] + c]
        assert (lo, hi) == (int(used.min()), int(used.max()))


def test_aligned_rows_widen_the_reachable_rows_to_whole_16_byte_rows_inside_the_table():
    for cfg in (DisentangledConfig(256, 512), DisentangledConfig(8, 32), DisentangledConfig(-1, 6),
                DisentangledConfig(-1, 5)):
        for n in (1, 2, 3, 5, 40, 129, 191, 300, 512):
            lo, hi = reachable_rows(cfg, n)
            alo, ahi = aligned_rows(cfg, n)
            width = ahi - alo + 1
            assert 0 <= alo <= lo and hi <= ahi < 2 * cfg.span, (cfg, n)
            assert width % 8 == 0 or width == 2 * cfg.span, (cfg, n, width)
            assert width < hi - lo + 1 + 8, (cfg, n, width)


def test_position_tables_from_one_batched_gemm_equal_the_two_gemms():
    from packformer.ops.disentangled_flash import _pair, position_scores
    cfg = DisentangledConfig(8, 32)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(37, 3, 4, 16, generator=g).unbind(1)          # views of one fused QKV
    both = torch.randn(2, 4, 16, 16, generator=g)                       # (pk, pq) stacked, as fast/cuda.py keeps them
    pk, pq = both[0], both[1]
    assert _pair(q, k) is not None and _pair(pk, pq) is not None
    assert _pair(k, q) is None and _pair(q, v.clone()) is None            # wrong order, another storage
    lo, hi = aligned_rows(cfg, 20)
    c2p, p2c = position_scores(q, k, pq, pk, cfg, lo, hi)               # one GEMM
    want_c2p, want_p2c = position_scores(q.clone(), k.clone(), pq.clone(), pk.clone(), cfg, lo, hi)   # two
    torch.testing.assert_close(c2p, want_c2p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p2c, want_p2c, rtol=1e-6, atol=1e-6)
    assert c2p.shape == (4, 37, hi - lo + 1)
    one = position_scores(q, k, pq, pk, DisentangledConfig(8, 32, ("p2c",)), lo, hi)
    assert one[0] is None and torch.allclose(one[1], want_p2c, atol=1e-6)


def test_launcher_rejects_mismatched_tables():
    cfg = DisentangledConfig(8, 32)
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="pos_q, pos_k must be"):
        disentangled_flash(q, q, q, cu, 5, torch.randn(2, 4, 8), torch.randn(2, 4, 8), cfg)
    with pytest.raises(ValueError, match="one dtype"):
        disentangled_flash(q, q, q, cu, 5, torch.randn(2, 16, 8).half(), torch.randn(2, 16, 8), cfg)


def test_kernel_under_triton_interpreter(run_interpreted):
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop bound loaded from memory")
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.disentangled import DisentangledConfig, disentangled_attention_ref
        from packformer.ops.disentangled_flash import disentangled_flash
        from packformer.ops.flash_varlen import FlashConfig, tile_table
        assert _triton.INTERPRET
        g = torch.Generator().manual_seed(0)
        # bucket edges of (8, 32): exact below 4, log beyond; of (64, 128): block pairs within 32 of the
        # diagonal take r as arithmetic (the EXACT branch), the rest the index; (-1, 24): clipped at 24
        lens = [1, 5, 6, 17, 0, 33, 12, 90]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        nh, d = 2, 16
        for cfg in (DisentangledConfig(8, 32, ("c2p", "p2c")), DisentangledConfig(-1, 8, ("c2p",)),
                    DisentangledConfig(8, 32, ("p2c",)), DisentangledConfig(64, 128, ("c2p", "p2c")),
                    DisentangledConfig(-1, 24, ("c2p", "p2c"))):
            q, k, v = (torch.randn(sum(lens), 3, nh, d, generator=g) * 1.5).unbind(1)   # strided views
            # pk before pq in one buffer: with both terms the tables come from one batched GEMM
            pk, pq = torch.randn(2, nh, 2 * cfg.span, d, generator=g).unbind(0)
            want = disentangled_attention_ref(q, k, v, cu, pq, pk, cfg)
            fc = FlashConfig(16, 16, 4, 1)
            for tiles in (torch.from_numpy(tile_table(lens, fc.block_m)), None):
                out = torch.full_like(q, float("nan"))
                got = disentangled_flash(q, k, v, cu, max(lens), pq, pk, cfg, out=out, config=fc, tiles=tiles)
                assert got is out and torch.isfinite(got).all()
                err = (got - want).abs().max().item()
                assert err < 1e-5, (cfg, tiles is None, err)
        print("ok")
    """)


def _inputs(lengths, cfg, nh=12, d=64, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, k, v = torch.randn(t, 3, nh, d, device="cuda", generator=g, dtype=dtype).unbind(1)
    pq, pk = (torch.randn(2, nh, 2 * cfg.span, d, device="cuda", generator=g) * 0.5).to(dtype).unbind(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, pq, pk, cu


REAL = DisentangledConfig(256, 512, ("c2p", "p2c"))          # DeBERTa-v3's own buckets


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_the_reference_as_closely_as_the_reference_in_half_precision(dtype, near_exact):
    from packformer.ops.flash_varlen import FlashConfig, default_config, tile_table
    lengths = [1, 63, 64, 65, 127, 128, 129, 200, 300, 512, 7, 0, 90]
    q, k, v, pq, pk, cu = _inputs(lengths, REAL, dtype=dtype)
    exact = disentangled_attention_ref(*(x.double() for x in (q, k, v)), cu, pq.double(), pk.double(), REAL)
    ref = disentangled_attention_ref(q, k, v, cu, pq, pk, REAL)
    tiles = torch.from_numpy(tile_table(lengths, 64)).cuda()
    for fc in (FlashConfig(64, 64, 4, 2), default_config(64, 512), FlashConfig(64, 16, 4, 3)):  # the family: 64x16
        for tl_ in (tiles, None):
            got = disentangled_flash(q, k, v, cu, max(lengths), pq, pk, REAL, config=fc, tiles=tl_)
            near_exact(got, ref, exact)


@cuda
@pytest.mark.gpu
def test_gpu_a_sequence_is_unaffected_by_its_neighbours_and_replays_in_a_cuda_graph():
    lengths = [40, 300, 5, 129]
    q, k, v, pq, pk, cu = _inputs(lengths, REAL)
    whole = disentangled_flash(q, k, v, cu, max(lengths), pq, pk, REAL)
    s = 40
    alone = disentangled_flash(q[s:s + 300], k[s:s + 300], v[s:s + 300],
                               torch.tensor([0, 300], dtype=torch.int32, device="cuda"), 300, pq, pk, REAL)
    assert torch.equal(whole[s:s + 300], alone)
    out = torch.empty_like(q)
    disentangled_flash(q, k, v, cu, 512, pq, pk, REAL, out=out)          # warm (compiles) before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        disentangled_flash(q, k, v, cu, 512, pq, pk, REAL, out=out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert (out - whole).abs().max().item() < 2e-3


@cuda
@pytest.mark.gpu
def test_gpu_grouped_torch_path_agrees_when_the_host_index_outgrew_the_device_one():
    from packformer.ops.attention import AttentionMeta
    from packformer.ops.disentangled import disentangled_attention, distance_index
    lengths = [30, 200, 7]
    q, k, v, pq, pk, cu = _inputs(lengths, REAL, dtype=torch.float32)
    distance_index(REAL, 512, "cuda")
    distance_index(REAL, 2000)                   # the host copy grows; the device one stays at 512
    got = disentangled_attention(q, k, v, AttentionMeta.build(cu, max(lengths), lengths), pq, pk, REAL)
    want = disentangled_attention_ref(q, k, v, cu, pq, pk, REAL)
    assert (got - want).abs().max().item() < 1e-4
