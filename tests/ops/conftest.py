"""Helpers for the fused-op tests: the tolerance rule (a kernel may err at most twice as much as the
reference implementation does, both measured against fp64) and Triton-interpreter runs on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def assert_near_exact(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, factor: float = 2.0) -> None:
    """The kernel's error vs the exact (fp64) result is at most `factor` x the reference's own error
    (plus one unit of the output dtype's rounding at the result's scale, for outputs the reference
    happens to round exactly)."""
    assert got.shape == ref.shape == exact.shape
    assert torch.isfinite(got).all(), "kernel output has NaN/inf (an element was not written?)"
    exact = exact.double()
    err_got = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * exact.abs().max().item()
    assert err_got <= factor * err_ref + ulp, f"kernel error {err_got:.3g} vs reference error {err_ref:.3g}"


@pytest.fixture
def near_exact():
    return assert_near_exact


@pytest.fixture
def run_interpreted():
    """Run a snippet in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before triton is
    imported, and this test process may already have imported it); fail with its output if it fails.
    Numerical warnings (overflow, invalid value) are errors there: the interpreter runs the kernel's fp32
    arithmetic in numpy, and a kernel that overflows on the way to a finite result would do so on a GPU."""
    pytest.importorskip("triton")

    def run(code: str) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
        r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"interpreted kernel check failed:\n{r.stdout}\n{r.stderr[-4000:]}"
        return r.stdout

    return run
