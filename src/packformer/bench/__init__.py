"""Benchmarks against the tools a user would otherwise run: standard workloads, peers built from the
same weights, the GEMM floor, the tutorial's experiment, and profiles.

`run_bench(...)` is the entry point for scripts; `packformer bench|tutorial|profile` are the CLI.
"""
from __future__ import annotations


def run_bench(*args, **kwargs) -> dict:
    """See packformer.bench.run.run_bench (imported lazily: the peers pull in heavy packages)."""
    from .run import run_bench as _run_bench
    return _run_bench(*args, **kwargs)


def run_tutorial(*args, **kwargs) -> dict:
    """See packformer.bench.tutorial.run_tutorial."""
    from .tutorial import run_tutorial as _run
    return _run(*args, **kwargs)


def run_profile(*args, **kwargs) -> dict:
    """See packformer.bench.profile.run_profile."""
    from .profile import run_profile as _run
    return _run(*args, **kwargs)


__all__ = ["run_bench", "run_tutorial", "run_profile"]
