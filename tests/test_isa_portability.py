"""Green on this CPU means green on every x86-64 CPU: the CPU-path tests run a second time with the
kernels capped at AVX2 (oneDNN, torch's own vectorized ops and MKL), whatever CPU runs the suite.

AVX2 without VNNI is the least that torch's x86 builds use, and where the kernels differ most from
AVX-512 and AMX ones: int8 products summed in int16 pairs, another GEMM blocking, other vectorized
activation and reduction code. Every decision the CPU path takes from the CPU (weight range, fused
ops) must then follow the cap too, and every result stay exact to its reference and batch-independent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# tests/families: every family runs the CPU path (rotary, GLU, position masks, disentangled attention)
CPU_PATH_TESTS = ["tests/fast", "tests/ops", "tests/test_engine.py", "tests/loaders/test_nn_module.py",
                  "tests/families"]
# less the tests no cap can change (Triton's interpreter runs kernels in numpy; GPU compiles): ~2.5 of ~4 minutes
MARKS = "not slow and not isa_free"


@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") == CAP["ONEDNN_MAX_CPU_ISA"],
                    reason="this run is already capped at AVX2")
def test_the_cpu_path_tests_pass_with_the_kernels_capped_at_avx2():
    env = dict(os.environ, **CAP)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKS, *CPU_PATH_TESTS],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    tail = "\n".join(r.stdout.splitlines()[-60:])
    assert r.returncode == 0, f"CPU-path tests failed under {CAP}:\n{tail}\n{r.stderr[-2000:]}"
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " failed" not in summary, summary
    print(f"under {CAP}: {summary}")
