"""Intra-op thread count for the CPU path.

Default: one thread per physical core this process may run on (hyper-threads share a core's FMA units,
so more threads only add contention to the GEMMs). Override with `packformer.load(..., threads=N)` or
the environment variable PACKFORMER_THREADS=N (the argument wins). torch's thread pool is process-wide:
the setting applies to everything else in the process that uses torch on the CPU, too.

Tokenizer threads are a separate pool (Rust/rayon, RAYON_NUM_THREADS); see benchmarks/NOTES-cpu.md for
the setting measured on 2 cores.
"""
from __future__ import annotations

import os

import torch

from .cpu_features import detect

ENV_THREADS = "PACKFORMER_THREADS"


def default_threads() -> int:
    """Physical cores available to this process."""
    return detect().physical_cores


def resolve_threads(threads: int | None = None) -> int:
    """`threads` if given, else $PACKFORMER_THREADS if set, else `default_threads()`."""
    source = "threads"
    if threads is None:
        env = os.environ.get(ENV_THREADS, "").strip()
        if not env:
            return default_threads()
        source = f"${ENV_THREADS}"
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"{source} must be a positive integer, got {env!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{source} must be a positive integer, got {threads!r}")
    return threads


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (see `resolve_threads`); returns the count in force."""
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def limit_process_threads(n: int) -> None:
    """Give a worker process (a Ray replica sharing the machine) `n` threads for both pools: torch's
    intra-op pool now, and the tokenizers' rayon pool and packformer.load's default through the
    environment (read when they start)."""
    os.environ["RAYON_NUM_THREADS"] = str(n)
    os.environ[ENV_THREADS] = str(n)
    torch.set_num_threads(n)
