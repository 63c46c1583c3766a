"""Fused RMSNorm after a sublayer's GEMM, for the decoder-style families (Qwen3, Gemma 3): one pass
instead of up to five.

A pre-norm layer computes `s = residual + a W^T + b` and then `RMSNorm(s)` for the next sublayer; Gemma's
sandwich layers first normalise the sublayer output itself: `s = residual + P(a W^T + b)`. Unfused that
is a bias add, a norm, a residual add and another norm, each reading and writing [T, H] (on an H200,
Qwen3-0.6B's offline batch spent 30% of its time in them). The kernel reads the GEMM output and the
residual once, keeps the row in fp32 and writes the sum (the next residual) and the normed row (and, for
fp8 GEMMs, the normed row in e4m3 with its scale, ops/fp8.py).

- `add_rmsnorm_ref`: plain torch in fp32 (the specification).
- `_add_rmsnorm_kernel`: Triton, one row per program.
- `add_rmsnorm`: the launcher; checks arguments, runs the kernel where it can, else the reference.
"""
from __future__ import annotations

import torch

from ._triton import kernel_ok, next_pow2, tl, triton
from .fp8 import empty_quantized, quantized_result
from .layernorm import check_row_args, reference_into


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dim, in x's dtype (fp32 or wider)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
                    x_bias: torch.Tensor | None = None, post_weight: torch.Tensor | None = None,
                    post_eps: float | None = None, return_sum: bool = False):
    """y = RMSNorm_w(s) with s = residual + P(x + x_bias), P = RMSNorm_post_weight or the identity; without
    `weight`, y = s. fp32 math (fp64 for fp64 inputs), each output rounded once to x's dtype. With
    return_sum, returns (y, s)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    s = x.to(acc)
    if x_bias is not None:
        s = s + x_bias.to(acc)
    if post_weight is not None:
        s = rms_norm_ref(s, post_weight, eps if post_eps is None else post_eps)
    if residual is not None:
        s = s + residual.to(acc)
    y = s if weight is None else rms_norm_ref(s, weight, eps)
    y = y.to(x.dtype)
    return (y, s.to(x.dtype)) if return_sum else y


if triton is not None:
    from .fp8 import E4M3_MAX, MIN_AMAX, store_quantized_row

    @triton.jit
    def _add_rmsnorm_kernel(X, XB, R, PW, W, Y, S, Q, QS, stride_x, stride_r, stride_y, stride_s, stride_q, N, eps,
                            post_eps, HAS_XB: tl.constexpr, HAS_POST: tl.constexpr, HAS_RES: tl.constexpr,
                            HAS_NORM: tl.constexpr, STORE_SUM: tl.constexpr, QUANT: tl.constexpr,
                            BLOCK: tl.constexpr, MAX: tl.constexpr, MIN_A: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_XB:
            s += tl.load(XB + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_POST:
            pw = tl.load(PW + cols, mask=mask, other=0.0).to(tl.float32)
            s = s * (1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + post_eps)) * pw
        if HAS_RES:
            s += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_SUM:
            tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=mask)
        if HAS_NORM:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            s = s * (1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)) * w
        y = s.to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)
        if QUANT:        # the rounded row, as ops/fp8.quantize_rows would quantize it
            store_quantized_row(y, mask, row, cols, Q, QS, stride_q, MAX, MIN_A)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
                x_bias: torch.Tensor | None = None, post_weight: torch.Tensor | None = None,
                post_eps: float | None = None, return_sum: bool = False, out: torch.Tensor | None = None,
                sum_out: torch.Tensor | None = None, quantize: bool = False):
    """[T, H] -> [T, H] in x's dtype: see `add_rmsnorm_ref`. `out` / `sum_out` may be given (CUDA graphs
    write into static buffers); `sum_out` may alias `x` or `residual` (each row is read before it is written).
    `quantize`: y comes back as an ops.fp8.Quantized (e4m3 rows with their scales, and y itself as `.x`)."""
    check_row_args(x, dict(weight=weight, x_bias=x_bias, post_weight=post_weight),
                   dict(residual=residual, out=out, sum_out=sum_out))
    if not kernel_ok(x, *(t for t in (weight, residual, x_bias, post_weight) if t is not None)):
        res = reference_into(add_rmsnorm_ref(x, weight, eps, residual, x_bias, post_weight, post_eps, return_sum),
                             return_sum, out, sum_out)
        return quantized_result(res, return_sum) if quantize else res
    t, h = x.shape
    y = torch.empty_like(x) if out is None else out
    s = (torch.empty_like(x) if sum_out is None else sum_out) if return_sum else y
    qy = empty_quantized(y) if quantize else None
    if t:
        block = next_pow2(h)
        _add_rmsnorm_kernel[(t,)](
            x, x if x_bias is None else x_bias, x if residual is None else residual,
            x if post_weight is None else post_weight, x if weight is None else weight, y, s,
            qy.q if quantize else y, qy.scale if quantize else y,
            x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), s.stride(0),
            qy.q.stride(0) if quantize else 0, h, eps,
            eps if post_eps is None else post_eps, HAS_XB=x_bias is not None, HAS_POST=post_weight is not None,
            HAS_RES=residual is not None, HAS_NORM=weight is not None, STORE_SUM=return_sum and s is not y,
            QUANT=quantize, BLOCK=block, MAX=E4M3_MAX, MIN_A=MIN_AMAX, num_warps=min(8, max(1, block // 256)))
    if quantize:
        y = qy
    return (y, s) if return_sum else y
