"""Gated feed-forward activation: [T, 2F] (gate | up) -> act(gate) * up [T, F], in one pass.

GLU families (ModernBERT's GeGLU, NomicBERT's SwiGLU, GTE's gated GELU) project to gate and up in one
GEMM; this kernel reads both halves once and writes the product, where torch would take three passes
(activation, multiply, and the copy out of the strided halves).
- `glu_ref`: the readable reference, fp32 math.
- `glu`: the Triton kernel on CUDA (or under the interpreter), else the reference.
"""
from __future__ import annotations

import torch

from ._triton import check, kernel_ok, tl, triton
from .gelu import ACTS, act_ref

if triton is not None:
    from .gelu import _act


def glu_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    """[T, 2F] -> act(x[:, :F]) * x[:, F:] [T, F], computed in fp32 and returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    gate, up = x.to(acc).chunk(2, dim=-1)
    return (act_ref(gate, act) * up).to(x.dtype)


if triton is not None:
    @triton.jit
    def _glu_kernel(X, Y, T, F, stride_x, stride_y, ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < T) & (cols[None, :] < F)
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + r64 * stride_x + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + r64 * stride_y + cols[None, :], (_act(g, ACT) * u).to(Y.dtype.element_ty), mask=mask)


ROWS, BLOCK = 8, 1024


def glu(x: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate) * up for x = [gate | up] of shape [T, 2F] -> [T, F] in x's dtype."""
    check(act in ACTS, f"unknown activation {act!r}; expected one of {tuple(ACTS)}")
    check(x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0,
          f"x must be [T, 2F] with contiguous rows, got shape {tuple(x.shape)}")
    check(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}")
    t, f = x.shape[0], x.shape[1] // 2
    if out is not None:
        check(out.shape == (t, f) and out.stride(1) == 1 and out.dtype == x.dtype,
              f"out must be [{t}, {f}] {x.dtype} with contiguous rows")
    if not kernel_ok(x):
        y = glu_ref(x, act)
        return y if out is None else out.copy_(y)
    y = torch.empty(t, f, dtype=x.dtype, device=x.device) if out is None else out
    if t:
        _glu_kernel[(triton.cdiv(t, ROWS), triton.cdiv(f, BLOCK))](
            x, y, t, f, x.stride(0), y.stride(0), ACT=ACTS[act], ROWS=ROWS, BLOCK=BLOCK, num_warps=8)
    return y
