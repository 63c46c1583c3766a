"""Fused (bias +) (residual +) LayerNorm over packed rows [T, H]: one pass instead of three.

After the attention out-projection and after FFN2 a post-norm layer computes
`LN(gemm_out + bias + residual)`; unfused that is an add, another add and a LayerNorm, each reading and
writing [T, H]. The kernel reads each input once, sums in fp32, and writes the normed row (and, for
pre-norm stacks, the sum itself, which is the next residual; for fp8 GEMMs, the normed row in e4m3 with
its scale, ops/fp8.py, which is the next GEMM's input).

- `add_layernorm_ref`: plain torch in fp32 (the specification).
- `_add_layernorm_kernel`: Triton, one row per program.
- `add_layernorm`: the launcher; checks shapes/dtypes, runs the kernel where it can, else the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import check, kernel_ok, next_pow2, tl, triton
from .fp8 import empty_quantized, quantized_result


def add_layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                      return_sum: bool = False):
    """LN(x + x_bias + residual) over the last dim, computed in fp32, returned in x's dtype.
    With return_sum, also returns the pre-norm sum (x's dtype)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    s = x.to(acc)
    if x_bias is not None:
        s = s + x_bias.to(acc)
    if residual is not None:
        s = s + residual.to(acc)
    y = F.layer_norm(s, (x.shape[-1],), weight.to(acc), bias.to(acc), eps).to(x.dtype)
    return (y, s.to(x.dtype)) if return_sum else y


if triton is not None:
    from .fp8 import E4M3_MAX, MIN_AMAX, store_quantized_row

    @triton.jit
    def _add_layernorm_kernel(X, XB, R, W, B, Y, S, Q, QS, stride_x, stride_r, stride_y, stride_s, stride_q, N, eps,
                              HAS_XB: tl.constexpr, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr,
                              QUANT: tl.constexpr, BLOCK: tl.constexpr, MAX: tl.constexpr, MIN_A: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_XB:
            x += tl.load(XB + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_SUM:
            tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / N
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = (d * rstd * w + b).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)
        if QUANT:        # the rounded row, as ops/fp8.quantize_rows would quantize it
            store_quantized_row(y, mask, row, cols, Q, QS, stride_q, MAX, MIN_A)


def check_row_args(x: torch.Tensor, vectors: dict, rows: dict) -> None:
    """The fused norms' argument checks: x [T, H] with contiguous rows; `vectors` (name -> [H] tensor or None)
    and `rows` (name -> [T, H] tensor or None, x's dtype) on x's device."""
    check(x.dim() == 2, f"x must be [T, H], got shape {tuple(x.shape)}")
    check(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}")
    h = x.shape[1]
    check(x.stride(1) == 1, "x rows must be contiguous (stride 1 along H)")
    for name, t in vectors.items():
        if t is not None:
            check(t.shape == (h,) and t.is_contiguous(), f"{name} must be a contiguous [{h}] vector, got {tuple(t.shape)}")
            check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")
    for name, t in rows.items():
        if t is not None:
            check(t.shape == x.shape and t.stride(1) == 1,
                  f"{name} must be [T, H] = {tuple(x.shape)} with contiguous rows, got {tuple(t.shape)}")
            check(t.dtype == x.dtype, f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
            check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")


def reference_into(res, return_sum: bool, out: torch.Tensor | None, sum_out: torch.Tensor | None):
    """A reference result (y, or (y, s) with return_sum) written into `out` / `sum_out` where given."""
    y, s = res if return_sum else (res, None)
    if out is not None:
        y = out.copy_(y)
    if return_sum and sum_out is not None:
        s = sum_out.copy_(s)
    return (y, s) if return_sum else y


def add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                  return_sum: bool = False, out: torch.Tensor | None = None, sum_out: torch.Tensor | None = None,
                  quantize: bool = False):
    """LN(x + x_bias + residual): [T, H] -> [T, H] in x's dtype (see `add_layernorm_ref`).

    `out` / `sum_out` may be given (CUDA graphs write into static buffers); `sum_out` may alias `x`.
    `quantize`: y comes back as an ops.fp8.Quantized (e4m3 rows with their scales, and y itself as `.x`)."""
    check_row_args(x, dict(weight=weight, bias=bias, x_bias=x_bias), dict(residual=residual, out=out, sum_out=sum_out))
    if not kernel_ok(x, weight, bias):
        res = reference_into(add_layernorm_ref(x, weight, bias, eps, residual, x_bias, return_sum), return_sum,
                             out, sum_out)
        return quantized_result(res, return_sum) if quantize else res
    t, h = x.shape
    y = torch.empty_like(x) if out is None else out
    s = (torch.empty_like(x) if sum_out is None else sum_out) if return_sum else y
    qy = empty_quantized(y) if quantize else None
    if t:
        block = next_pow2(h)
        _add_layernorm_kernel[(t,)](
            x, x_bias if x_bias is not None else x, residual if residual is not None else x, weight, bias, y, s,
            qy.q if quantize else y, qy.scale if quantize else y,
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), s.stride(0),
            qy.q.stride(0) if quantize else 0, h, eps,
            HAS_XB=x_bias is not None, HAS_RES=residual is not None, STORE_SUM=return_sum, QUANT=quantize,
            BLOCK=block, MAX=E4M3_MAX, MIN_A=MIN_AMAX, num_warps=min(8, max(1, block // 256)))
    if quantize:
        y = qy
    return (y, s) if return_sum else y
