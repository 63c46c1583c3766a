"""GEMMs of few rows (M <= 64: single queries, the smallest CUDA-graph bucket) split along K.

    y = act(x @ W^T + bias) + residual          x [M, K], W [N, K] (nn.Linear), y [M, N]

With a few rows a GEMM is a read of its weights, and cuBLAS gives it one program per output tile: a
768-wide layer runs on 6-24 of 132 multiprocessors, each streaming its slice of W alone (on an H200 the
48 GEMMs of bert-base at 10 rows take 0.25 ms in one CUDA graph, 5 us each, for 170 MB of weights
that the memory system moves in ~45 us). Here the K range is also split, so 140-290 programs each read a
[32, K / split] slice of W; each writes its fp32 partial tile to a workspace and takes a ticket from the
tile's counter, and the program holding the last ticket sums the partials in split order (the same
order whichever program finishes last: the result is deterministic), applies bias, activation and
residual, writes y and resets the counter for the next call (or CUDA-graph replay).

- `skinny_linear_ref`: plain torch in fp32 (the specification).
- `SkinnyWorkspace`: the fp32 partials and int32 counters one model's GEMMs share (one stream at a time).
- `skinny_linear`: the launcher (split chosen from the tile count); `_skinny_kernel`: the kernel.
"""
from __future__ import annotations

import torch

from ._triton import check, kernel_ok, tl, triton
from .gelu import ACTS, act_ref

MAX_ROWS = 64            # the fast path sends GEMMs of at most this many rows here
BLOCK_N, BLOCK_K = 32, 64
MAX_SPLIT = 8


def skinny_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight^T + bias) + residual in fp32, returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    if act is not None:
        y = act_ref(y, act)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


class SkinnyWorkspace:
    """Partial tiles [MAX_SPLIT, N / BLOCK_N, 64, BLOCK_N] fp32 and one counter per output tile, for
    GEMMs of up to `max_n` outputs. Allocated once, before any CUDA-graph capture; the kernel leaves the
    counters at zero. Calls must not overlap (the fast path launches on one stream under a lock)."""

    def __init__(self, max_n: int, device: torch.device | str):
        self.max_n = int(max_n)
        tiles = -(-self.max_n // BLOCK_N)
        self.partials = torch.empty(MAX_SPLIT * tiles * MAX_ROWS * BLOCK_N, dtype=torch.float32, device=device)
        self.counters = torch.zeros(tiles, dtype=torch.int32, device=device)


def split_for(n: int, k: int, programs: int) -> tuple[int, int]:
    """(split, K steps per split): enough programs to cover ~2 waves of `programs` multiprocessors,
    at least two BLOCK_K steps each, at most MAX_SPLIT."""
    tiles = -(-n // BLOCK_N)
    steps = -(-k // BLOCK_K)
    split = max(1, min(-(-2 * programs // tiles), steps // 2, MAX_SPLIT))
    per = -(-steps // split)
    return -(-steps // per), per


if triton is not None:
    from .gelu import _act

    @triton.jit
    def _skinny_kernel(X, W, BIAS, RES, Y, WS, CNT, M, N, K, stride_xm, stride_wn, stride_rm, stride_ym,
                       STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_ACT: tl.constexpr, HAS_RES: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k0 = pid_k * STEPS * BLOCK_K
        for i in tl.static_range(STEPS):    # this program's K slice, unrolled: every load is issued at once
            k = k0 + i * BLOCK_K + rk
            k_ok = k < K
            x = tl.load(X + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)                                                     # [BN, BK]
            acc = tl.dot(x, tl.trans(w), acc)                                          # [BM, BN] fp32
        finish = True
        if SPLIT > 1:
            tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            num_n = tl.num_programs(0)
            tl.store(WS + (pid_k * num_n + pid_n) * (BLOCK_M * BLOCK_N) + tile, acc)
            ticket = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")   # publishes the partial, orders the reads
            finish = ticket == SPLIT - 1
            if finish:                                          # the last: every partial is in, sum in order
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for s in tl.static_range(SPLIT):
                    acc += tl.load(WS + (s * num_n + pid_n) * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
                tl.atomic_xchg(CNT + pid_n, 0)                  # ready for the next call or replay
        if finish:
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ACT:
                acc = _act(acc, ACT)
            mask = m_ok[:, None] & n_ok[None, :]
            if HAS_RES:
                acc += tl.load(RES + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  workspace: SkinnyWorkspace | None = None) -> torch.Tensor:
    """act(x @ weight^T + bias) + residual: x [M <= 64, K], weight [N, K] -> [M, N] in x's dtype.
    `out` may be `residual` (in place: residual += ..., as addmm_ does). Without a workspace (or with one
    too small for N) the K range is not split."""
    check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
          f"x [M, K] and weight [N, K] do not fit: {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    check(m <= MAX_ROWS, f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    check(act is None or act in ACTS, f"unknown activation {act!r}; expected one of {tuple(ACTS)}")
    check(x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need contiguous rows")
    check(x.dtype == weight.dtype, f"x and weight need one dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        check(bias.shape == (n,) and bias.is_contiguous(), f"bias must be a contiguous [{n}] vector")
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            check(t.shape == (m, n) and t.stride(1) == 1 and t.dtype == x.dtype,
                  f"{name} must be [{m}, {n}] {x.dtype} with contiguous rows, got {tuple(t.shape)} {t.dtype}")
    if not kernel_ok(x, weight):
        y = skinny_linear_ref(x, weight, bias, act, residual)
        return y if out is None else out.copy_(y)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    split, steps = split_for(n, k, programs)
    if workspace is None or workspace.max_n < n:
        split, steps = 1, -(-k // BLOCK_K)
    ws = workspace.partials if split > 1 else y
    cnt = workspace.counters if split > 1 else y
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    _skinny_kernel[(triton.cdiv(n, BLOCK_N), split)](
        x, weight, bias if bias is not None else x, residual if residual is not None else x, y, ws, cnt, m, n, k,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), steps,
        HAS_BIAS=bias is not None, ACT=ACTS[act] if act is not None else 0, HAS_ACT=act is not None,
        HAS_RES=residual is not None, SPLIT=split, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4, num_stages=3)
    return y


__all__ = ["MAX_ROWS", "SkinnyWorkspace", "skinny_linear", "skinny_linear_ref", "split_for"]
