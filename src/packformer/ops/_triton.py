"""Whether a Triton kernel can run on a tensor: on CUDA with Triton installed, or on CPU under
Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported), which CI uses for tiny shapes."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU builds of torch come without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_ok(*tensors: torch.Tensor) -> bool:
    """True where the Triton kernel (not the torch reference) should run on these tensors."""
    if not HAS_TRITON:
        return False
    return all(t.is_cuda for t in tensors) or (INTERPRET and all(t.device.type == "cpu" for t in tensors))


def check(cond: bool, msg: str) -> None:
    """Launcher argument check: a clear ValueError instead of a crash inside the kernel."""
    if not cond:
        raise ValueError(msg)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
