"""Host time of one fp8 GEMM launch (ops/fp8.fp8_linear), one quantize pass and one cuBLAS F.linear, and a
cProfile of the fp8 launch: what an eager (un-graphed) fp8 forward pays the host per GEMM.

    PYTHONPATH=src python benchmarks/fp8_host_launch.py [--tokens 2209] [--calls 200]

Each figure is the host's time per call over `calls` calls issued without waiting for the GPU (the queue
never fills at these sizes); needs an fp8 GPU with TMA (Hopper) for the Triton kernel.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from packformer.ops.fp8 import fp8_linear, quantize_rows, quantize_weight


def host_us(fn, calls: int) -> float:
    for _ in range(20):                      # compiles, creates library handles
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) / calls * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2209)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    x = torch.randn(args.tokens, 768, device="cuda", dtype=torch.float16)
    w = torch.randn(3072, 768, device="cuda", dtype=torch.float16) * 0.02
    b = torch.zeros(3072, device="cuda", dtype=torch.float16)
    wq, ws = quantize_weight(w)
    a = quantize_rows(x)
    for name, fn in (("fp8_linear", lambda: fp8_linear(a, wq, ws, b)), ("quantize_rows", lambda: quantize_rows(x)),
                     ("F.linear", lambda: torch.nn.functional.linear(x, w, b))):
        print(name, "host us per call", host_us(fn, args.calls))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.calls):
        fp8_linear(a, wq, ws, b)
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    print(s.getvalue())


if __name__ == "__main__":
    main()
