"""GEMMs of few rows split along K (ops/skinny_gemm.py): the reference is act(x W^T + b) + residual; the
kernel equals it (under the Triton interpreter on CPU and on a GPU) for every split, row count and
epilogue; the last program of a tile sums the partials in split order, so repeated calls agree to the
bit and leave the counters at zero; it replays inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from packformer.ops.skinny_gemm import (BLOCK_K, BLOCK_N, MAX_ROWS, MAX_SPLIT, SkinnyWorkspace, skinny_linear,
                                        skinny_linear_ref, split_for)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_reference_is_the_affine_map_then_activation_then_residual():
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 8), (12, 8), (12,), (5, 12)))
    assert torch.allclose(skinny_linear_ref(x, w), x @ w.T)
    assert torch.allclose(skinny_linear_ref(x, w, b, "gelu", r), torch.nn.functional.gelu(x @ w.T + b) + r)


def test_split_covers_k_with_two_steps_or_more_and_fills_the_machine():
    for n, k in ((768, 768), (2304, 768), (3072, 768), (768, 3072), (4096, 1024), (64, 64), (30, 4000)):
        split, per = split_for(n, k, 132)
        steps = -(-k // BLOCK_K)
        assert 1 <= split <= MAX_SPLIT and (split - 1) * per < steps <= split * per, (n, k, split, per)
        assert split == 1 or per >= 2
    assert split_for(768, 3072, 132)[0] * (768 // BLOCK_N) >= 132          # FFN2 of bert-base: > 1 wave


def test_launcher_rejects_what_it_cannot_run():
    x, w = torch.zeros(4, 8, dtype=torch.float16), torch.zeros(6, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        skinny_linear(x, torch.zeros(6, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_linear(torch.zeros(MAX_ROWS + 1, 8, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="unknown activation"):
        skinny_linear(x, w, act="swish")
    with pytest.raises(ValueError, match="one dtype"):
        skinny_linear(x, w.float())
    with pytest.raises(ValueError, match="residual must be"):
        skinny_linear(x, w, residual=torch.zeros(4, 5, dtype=torch.float16))


def test_cpu_without_the_interpreter_runs_the_reference():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    r = torch.randn(3, 8, generator=g)
    got = skinny_linear(x, w, b, "relu", residual=r.clone(), out=None)
    assert torch.equal(got, skinny_linear_ref(x, w, b, "relu", r))


def test_kernel_under_triton_interpreter(run_interpreted):
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop bound given as an argument")
    run_interpreted("""
        import torch
        from packformer.ops import skinny_gemm as S
        from packformer.ops.skinny_gemm import SkinnyWorkspace, skinny_linear, skinny_linear_ref
        g = torch.Generator().manual_seed(0)
        ws = SkinnyWorkspace(200, "cpu")
        # n not a multiple of the tile, k not a multiple of the step; 1-64 rows (three row tiles)
        for m, n, k in ((1, 72, 300), (10, 200, 520), (33, 40, 64), (64, 96, 130)):
            x = torch.randn(m, k, generator=g).half()
            w = (torch.randn(n, k, generator=g) * 0.1).half()
            b = torch.randn(n, generator=g).half()
            r = torch.randn(m, n, generator=g).half()
            for split in (1, 2, 3):
                S.split_for = lambda n_, k_, p, split=split: (split, -(-(-(-k_ // S.BLOCK_K)) // split))
                for kw in ({}, {"bias": b, "act": "gelu"}, {"bias": b, "residual": r}):
                    want = skinny_linear_ref(x, w, **kw).float()
                    out = torch.full((m, n), float("nan"), dtype=torch.float16)
                    got = skinny_linear(x, w, out=out, workspace=ws, **kw)
                    assert got is out and torch.isfinite(got).all()
                    err = (got.float() - want).abs().max().item()
                    assert err <= 2e-3 * max(1.0, want.abs().max().item()), (m, n, k, split, kw.keys(), err)
                    assert torch.equal(skinny_linear(x, w, workspace=ws, **kw), got)      # the same bits again
                    assert int(ws.counters.abs().sum()) == 0                              # counters reset
            # in place: residual += x W^T, as addmm_ does
            res = r.clone()
            S.split_for = lambda n_, k_, p: (2, -(-(-(-k_ // S.BLOCK_K)) // 2))
            assert skinny_linear(x, w, residual=res, out=res, workspace=ws) is res
            assert (res.float() - skinny_linear_ref(x, w, residual=r).float()).abs().max().item() < 2e-2
        print("ok")
    """)


def _inputs(m, n, k, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    r = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return x, w, b, r


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 10, 16, 17, 33, 64])
def test_gpu_matches_the_reference_as_closely_as_cublas(dtype, m, near_exact):
    ws = SkinnyWorkspace(3072, "cuda")
    for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072), (1000, 200)):
        x, w, b, r = _inputs(m, n, k, dtype)
        exact = skinny_linear_ref(x.double(), w.double(), b.double(), "gelu", r.double())
        ref = (torch.nn.functional.gelu((x @ w.T).float() + b.float()) + r.float()).to(dtype)     # cuBLAS + epilogue
        got = skinny_linear(x, w, b, "gelu", r, workspace=ws)
        near_exact(got, ref, exact)
        assert torch.equal(skinny_linear(x, w, b, "gelu", r, workspace=ws), got)
        assert int(ws.counters.abs().sum()) == 0


@cuda
@pytest.mark.gpu
def test_gpu_replays_in_a_cuda_graph_in_place():
    ws = SkinnyWorkspace(3072, "cuda")
    x, w, b, r = _inputs(64, 768, 3072)
    res = r.clone()
    want = skinny_linear(x, w, residual=r.clone(), workspace=ws)
    skinny_linear(x, w, residual=res.clone(), out=res.clone(), workspace=ws)       # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        skinny_linear(x, w, residual=res, out=res, workspace=ws)
    for _ in range(3):
        res.copy_(r)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(res, want)
    assert int(ws.counters.abs().sum()) == 0
