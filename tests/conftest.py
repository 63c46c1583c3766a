"""Shared fixtures. GPU tests are marked `gpu` and skipped, with a reason, where no CUDA GPU exists."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    for item in items:      # Triton's interpreter runs kernels in numpy: no oneDNN / ATen ISA is involved
        if "run_interpreted" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.isa_free)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir():
    from packformer.loading import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    import packformer

    return packformer.load(minilm_dir)


@pytest.fixture
def run_interpreted():
    """Run a snippet in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before triton is
    imported, and this test process may already have imported it); fail with its output if it fails.
    Numerical warnings (overflow, invalid value) are errors there: the interpreter runs the kernel's fp32
    arithmetic in numpy, and a kernel that overflows on the way to a finite result would do so on a GPU."""
    pytest.importorskip("triton")

    def run(code: str) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        src = os.path.join(os.path.dirname(__file__), "..", "src")
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
        r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"interpreted kernel check failed:\n{r.stdout}\n{r.stderr[-4000:]}"
        return r.stdout

    return run
