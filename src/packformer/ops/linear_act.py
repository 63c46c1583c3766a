"""FFN1 with its bias and activation in the GEMM epilogue: act(x @ W^T + b), [T, K] -> [T, N].

The [T, N] intermediate (N = 4H) is the largest tensor of a layer; applying bias and GELU while the
tile is still in registers saves a full read and write of it (cuBLAS's own GELU epilogue is the tanh
approximation, which BERT's erf GELU is not). The CUDA fast path (fast/cuda.py) runs an erf-GELU FFN1
through `linear_act_tma` on Hopper for batches of at least 16,384 tokens, where the whole forward
measured faster on an H100/H200 (benchmarks/NOTES-gpu.md); smaller batches and other GPUs run cuBLAS
followed by `bias_act`. The pointer-based `linear_act` reached about 55% of cuBLAS's rate on an H100,
so the library itself does not call it.

- `linear_act_ref`: plain torch in fp32 (the specification).
- `_linear_act_kernel`: Triton tiled GEMM (grouped tile order), fp32 accumulator, fused epilogue.
- `linear_act`: its launcher (checks shapes/dtypes; tile config by problem size).
- `_linear_act_tma_kernel` / `linear_act_tma`: the Hopper variant, tiles moved by the TMA engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import check, kernel_ok, tl, triton
from .gelu import ACTS, act_ref


def linear_act_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ weight^T + bias) in fp32, returned in x's dtype. weight is nn.Linear's [N, K]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return act_ref(y, act).to(x.dtype)


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Chosen on an H100 by benchmarks/gpu_fastpath.py (see NOTES-gpu.md); small problems want small tiles
# so that enough programs exist to fill 132 multiprocessors.
SMALL = TileConfig(64, 128, 64, 8, 4, 4)
LARGE = TileConfig(128, 256, 64, 8, 8, 3)


def default_config(m: int, n: int) -> TileConfig:
    tiles_large = triton.cdiv(m, LARGE.block_m) * triton.cdiv(n, LARGE.block_n) if triton else 0
    return LARGE if tiles_large >= 264 else SMALL


if triton is not None:
    from .gelu import _act

    @triton.jit
    def _linear_act_kernel(A, W, BIAS, C, M, N, K, stride_am, stride_wn, stride_cm,
                           HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)   # wrapped rows: loads stay in bounds
        rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        a_ptrs = A + ram[:, None].to(tl.int64) * stride_am + rk[None, :]
        w_ptrs = W + rbn[None, :].to(tl.int64) * stride_wn + rk[:, None]           # W^T tile [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
                w = tl.load(w_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc = _act(acc, ACT)
        c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def tma_tile(a_desc, w_desc, tile, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """Output tile number `tile` of A W^T in grouped order (GROUP_M row tiles share each weight tile
        while it is in L2): (off_m, off_n, the fp32 product over K), A and W moved by the TMA engine.
        The main loop of this file's TMA kernel and of ops/fp8.py's."""
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        first_m = (tile // width) * GROUP_M
        size_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        off_m = (first_m + (tile % width) % size_m) * BLOCK_M
        off_n = ((tile % width) // size_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        return off_m, off_n, acc

    @triton.jit
    def _linear_act_tma_kernel(a_desc, w_desc, c_desc, BIAS, M, N, K, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, NUM_PROGRAMS):
        """Hopper variant: tiles moved by the TMA engine (host tensor descriptors); with fewer programs
        than tiles it is persistent (each program walks tiles NUM_PROGRAMS apart)."""
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS,
                             flatten=True):
            off_m, off_n, acc = tma_tile(a_desc, w_desc, tile, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
            if HAS_BIAS:
                rn = off_n + tl.arange(0, BLOCK_N)
                acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            acc = _act(acc, ACT)
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def linear_act_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "gelu",
                   config: TileConfig | None = None, persistent: bool = True) -> torch.Tensor:
    """`linear_act` through the TMA kernel (CUDA, Hopper; contiguous rows whose byte size is a multiple
    of 16). The CUDA fast path runs FFN1 through it on batches of at least 16,384 tokens."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    check(x.is_cuda and x.is_contiguous() and weight.is_contiguous(), "linear_act_tma needs contiguous CUDA tensors")
    check(x.shape[1] == weight.shape[1] and x.dtype == weight.dtype, "x [T, K] and weight [N, K] do not fit")
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or LARGE
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    progs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count) if persistent else tiles
    _linear_act_tma_kernel[(progs,)](
        TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
        TensorDescriptor.from_tensor(y, [cfg.block_m, cfg.block_n]), bias if bias is not None else x, m, n, k,
        HAS_BIAS=bias is not None, ACT=ACTS[act], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, NUM_PROGRAMS=progs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "gelu",
               out: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """act(x @ weight^T + bias): x [T, K], weight [N, K] (nn.Linear layout) -> [T, N] in x's dtype."""
    check(act in ACTS, f"unknown activation {act!r}; expected one of {tuple(ACTS)}")
    check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
          f"x [T, K] and weight [N, K] do not fit: {tuple(x.shape)} and {tuple(weight.shape)}")
    check(x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need contiguous rows")
    check(x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16),
          f"linear_act runs fp16/bf16 with matching dtypes, got x {x.dtype}, weight {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None:
        check(bias.shape == (n,) and bias.is_contiguous(), f"bias must be a contiguous [{n}] vector")
    if out is not None:
        check(out.shape == (m, n) and out.stride(1) == 1 and out.dtype == x.dtype, f"out must be [{m}, {n}] {x.dtype}")
    if not kernel_ok(x, weight):
        y = linear_act_ref(x, weight, bias, act)
        return y if out is None else out.copy_(y)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m:
        cfg = config or default_config(m, n)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _linear_act_kernel[grid](x, weight, bias if bias is not None else x, y, m, n, k, x.stride(0), weight.stride(0),
                                 y.stride(0), HAS_BIAS=bias is not None, ACT=ACTS[act], BLOCK_M=cfg.block_m,
                                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                                 EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
