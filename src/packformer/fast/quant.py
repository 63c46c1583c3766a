"""int8 mode for the Linear layers of the CPU path (`packformer.load(..., quantize="int8")`).

Weights: int8, symmetric, one scale per output channel, quantized once at load. Activations: uint8 with
one scale per tensor, chosen at run time from the tensor's range (dynamic quantization), so no
calibration data is needed. The GEMM runs in int8 with int32 accumulation (fbgemm, VNNI / AMX where the
CPU has it) and returns fp32; bias is added inside the same call.

Why torch's own quantized ops (torch.ops.quantized.linear_dynamic, the kernel of
torch.ao quantize_dynamic) and not torchao: measured on the 2-core target (benchmarks/NOTES-cpu.md)
torchao's Int8DynamicActivationInt8Weight ran ~5x slower than fp32 in eager mode and only matched fp32
under torch.compile (after ~50 s of compilation), while the fbgemm kernel is ~2x faster than fp32 with
no compilation. torch marks its quantized tensor type deprecated; the weight is converted through it
once, here, with the warning silenced, and `int8_available()` lets callers fail early where a future
torch no longer ships the op.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .cpu_features import detect
from .cpu_linear import act_

QUANTIZE_MODES = ("int8",)


@functools.lru_cache(maxsize=1)
def int8_available() -> bool:
    try:
        return hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")
    except Exception:  # pragma: no cover - depends on the torch build
        return False


def check_quantize(quantize: str | None) -> str | None:
    """None or "int8"; anything else is a ValueError naming the accepted modes."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unsupported quantize={quantize!r}; expected None or one of {QUANTIZE_MODES}")
    if not int8_available():
        raise RuntimeError("quantize='int8' needs torch.ops.quantized.linear_dynamic, which this torch build "
                           f"({torch.__version__}) lacks; load without quantize")
    return quantize


class DynamicInt8Linear:
    """y = x W^T + b with int8 W (per-channel) and x quantized per tensor at run time; fp32 in and out."""

    def __init__(self, linear: nn.Linear, reduce_range: bool | None = None):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()                             # [out, in]
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()           # [out]
        zero = torch.zeros(self.out_features, dtype=torch.int64)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's deprecation notice for quantized tensors
            qw = torch.quantize_per_channel(w, scales, zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        # Without VNNI, x86 int8 GEMMs sum pairs of u8*s8 products in int16 and can saturate: 7-bit
        # activations avoid that. With VNNI (or AMX) the full 8 bits are safe and more accurate.
        self.reduce_range = (not detect().int8_native) if reduce_range is None else reduce_range

    def __call__(self, x: torch.Tensor, act: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        if act == "relu" and residual is None:
            return torch.ops.quantized.linear_relu_dynamic(x, self.packed, self.reduce_range)
        y = torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        if residual is not None:
            return y.add_(residual)
        return act_(y, act)
