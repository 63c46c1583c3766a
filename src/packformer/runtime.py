"""Device and dtype choice, and length-sorted chunking under a token budget."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# CPU: 4,096 tokens keep each batch's largest buffer (FFN1's [T, 4H] fp32) small enough for glibc to
# recycle from its heap instead of mapping fresh zeroed pages per call; measured end to end on the 2-core
# VM (1,500 texts, all-MiniLM-L6-v2): 10.8k tokens/s vs 9.5k at 8,192 (benchmarks/NOTES-cpu.md).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but no CUDA GPU is available "
                           "(torch.cuda.is_available() is False); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} was requested but only {torch.cuda.device_count()} GPU(s) exist")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device type {dev.type!r}: packformer runs on 'cpu' and 'cuda'")
    return dev


FP8_NAMES = ("float8", "fp8", "float8_e4m3fn", "e4m3")


def is_fp8(dtype) -> bool:
    """dtype='float8' (the fp8 GEMM mode of the CUDA fast path, fast/fp8.py) in any of its spellings."""
    return dtype is torch.float8_e4m3fn or (isinstance(dtype, str) and dtype.lower() in FP8_NAMES)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  cuda_default: str | torch.dtype = torch.float16) -> torch.dtype:
    """None -> fp32 on CPU, `cuda_default` on CUDA (fp16; a model family may state bf16: families.model_dtype).
    bf16 and fp16 are opt-in on CPU (fp16 only where supported)."""
    if dtype is None:
        return resolve_dtype(cuda_default, device) if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on CPU (no fast fp16 GEMMs); use dtype='bfloat16' or 'float32'")
    return dtype


def check_batch_size(batch_size, optional: bool = True) -> None:
    """A sequences-per-batch cap (plan_chunks' max_batch_size) must be a positive integer (or None where
    `optional`): 0 or a negative number would otherwise put every sequence in a batch of its own."""
    if batch_size is None and optional:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer{' or None' if optional else ''}, got {batch_size!r}")


def plan_chunks(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Indices grouped into chunks, longest first, each holding at most `max_batch_tokens` tokens
    (a single longer sequence gets a chunk of its own) and at most `max_batch_size` sequences."""
    if max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and (tokens + n > max_batch_tokens or full):
            chunks.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        chunks.append(cur)
    return chunks
