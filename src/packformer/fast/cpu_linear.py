"""Linear layers of the CPU path: each GEMM call also does the elementwise work that follows it.

A transformer layer's elementwise work (bias, GELU, residual add) costs ~25% of its GEMM time on
2 cores when run as separate passes over [T, 4H] tensors (benchmarks/NOTES-cpu.md). oneDNN applies it
as a post-op while the output tile is still in cache: `torch.ops.mkldnn._linear_pointwise`, the op that
inductor emits for frozen CPU graphs, on weights reordered once into oneDNN's blocked layout. Those ops
are private to torch, so `onednn_available()` probes them once against F.linear and the path falls back
to `AtenLinear` (addmm, then in-place GELU / add) where they are missing or disagree.

Every class here is called as `lin(x, act=None, residual=None)`: `act` in ACTIVATIONS applies after the
bias, `residual` ([T, out]) is added after the bias; never both.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# activation name (config.ACTIVATIONS) -> oneDNN post-op (attr, algorithm)
ONEDNN_POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                   "relu": ("relu", "")}


class CpuLinear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor, act: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor: ...


# ATen's elementwise kernels run full SIMD vectors, then a scalar loop over what is left of the range one
# thread was given; the scalar transcendental rounds differently from the vector one. Over a [T, F] buffer
# both the thread split (N / threads) and the end of the range move with T, so a token's activation would
# depend on the rest of its batch. act_ therefore runs on ranges of whole vectors only, each on one thread.
VECTOR_ELEMENTS = 64                    # every SIMD width divides it (fp32 AVX-512 unrolled: 32; bf16: 64)
SERIAL_ELEMENTS = 32768 - VECTOR_ELEMENTS   # under ATen's grain size (32768): one thread, no split inside


def _act_fn(act: str):
    if act == "gelu":
        return torch.ops.aten.gelu_
    if act == "gelu_tanh":
        return lambda y: torch.ops.aten.gelu_(y, approximate="tanh")
    if act == "relu":
        return torch.relu_
    if act == "silu":
        return lambda y: torch.nn.functional.silu(y, inplace=True)
    raise ValueError(f"unknown activation {act!r}; expected one of {[k for k in ONEDNN_POST_OPS if k] + ['silu']}")


def act_(y: torch.Tensor, act: str | None) -> torch.Tensor:
    """The activation in place (no second [T, F] buffer), the same bits for an element wherever it sits in
    `y` (see VECTOR_ELEMENTS): the buffer in ranges of whole vectors, and its last partial vector through a
    small padded copy. y must be contiguous."""
    if act is None:
        return y
    fn = _act_fn(act)
    if not y.is_contiguous():
        raise ValueError("act_ runs on a contiguous buffer")
    flat = y.view(-1)
    n = flat.numel()
    whole = n - n % VECTOR_ELEMENTS
    for c0 in range(0, whole, SERIAL_ELEMENTS):
        fn(flat[c0:min(c0 + SERIAL_ELEMENTS, whole)])
    if whole < n:
        tail = flat.new_zeros(VECTOR_ELEMENTS)
        tail[:n - whole] = flat[whole:]
        flat[whole:] = fn(tail)[:n - whole]
    return y


class AtenLinear:
    """addmm (bias folded into the GEMM), then the activation or residual add in place."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = linear.weight.detach().to(dtype).t()                        # [in, out] view
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def __call__(self, x, act=None, residual=None):
        y = torch.addmm(self.bias, x, self.weight_t) if self.bias is not None else x @ self.weight_t
        if residual is not None:
            return y.add_(residual)
        return act_(y, act)


class OneDnnLinear:
    """One oneDNN call per GEMM with bias + activation or bias + residual fused, packed weights.

    A row's result does not depend on the other rows: oneDNN's GEMM kernels sum each row in the same
    order at every row count but one. A single row goes to a matrix-vector kernel that (with AVX-512,
    K >= 1536) sums in another order, so it runs as two rows; the copy costs nothing at that size.
    (torch's `addmm` calls a BLAS whose summation order changes with the row count: `AtenLinear` is
    only the fallback for torch builds without these ops.)"""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(dtype).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None)              # blocked, opaque
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).contiguous()

    def __call__(self, x, act=None, residual=None):
        if x.shape[0] == 1:
            two = self(x.expand(2, -1).contiguous(), act,
                       None if residual is None else residual.expand(2, -1).contiguous())
            return two[:1]
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if act not in ONEDNN_POST_OPS:           # no oneDNN post-op for it (SiLU): a second pass
            return act_(torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], ""), act)
        attr, algorithm = ONEDNN_POST_OPS[act]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)


@functools.lru_cache(maxsize=None)
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether the fused oneDNN ops exist in this torch build and agree with F.linear on a small case."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
            lin.bias.copy_(torch.randn(48, generator=g))
        x = torch.randn(7, 64, generator=g).to(dtype)
        r = torch.randn(7, 48, generator=g).to(dtype)
        fused = OneDnnLinear(lin, dtype)
        w, b = lin.weight.to(dtype), lin.bias.to(dtype)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        with torch.inference_mode():
            ref = F.linear(x, w, b)
            pairs = [(fused(x), ref), (fused(x, act="gelu"), F.gelu(ref)),
                     (fused(x, act="gelu_tanh"), F.gelu(ref, approximate="tanh")),
                     (fused(x, act="relu"), F.relu(ref)), (fused(x, residual=r), ref + r)]
        return all(a.dtype == dtype and torch.allclose(a.float(), e.float(), atol=tol, rtol=tol) for a, e in pairs)
    except Exception:
        return False


def make_linear(linear: nn.Linear, dtype: torch.dtype) -> CpuLinear:
    """The fused oneDNN linear where this torch build runs it correctly, else addmm + in-place ops."""
    return OneDnnLinear(linear, dtype) if onednn_available(dtype) else AtenLinear(linear, dtype)
