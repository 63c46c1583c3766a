"""Helpers for the fused-op tests: the tolerance rule (a kernel may err at most twice as much as the
reference implementation does, both measured against fp64). Triton-interpreter runs on CPU: the
`run_interpreted` fixture of tests/conftest.py."""
from __future__ import annotations

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
