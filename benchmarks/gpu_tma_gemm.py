"""Can a Triton TMA GEMM with the bias + erf-GELU epilogue reach cuBLAS's rate on FFN1 shapes (H100/H200)?

Variants of ops/linear_act.py's kernel, defined here (the library keeps one): its own form (128x256x64,
8 warps, 3 stages, persistent); the epilogue stored as two 128-wide halves (less shared memory for the
output tile, so 4 stages fit); warp specialization of the tile loop; other tiles; non-persistent.
Against cuBLAS alone and cuBLAS + the `bias_act` pass, on bert-base's, ModernBERT's (the GLU FFN1's
N) and xlmr-large's FFN1 at offline_b256's 35,201 tokens and bert-base's at serve_b32's 2,209
(there every figure includes the host's launch). Prints a table and writes JSON (NOTES-gpu.md).

    PYTHONPATH=src python3 benchmarks/gpu_tma_gemm.py --out $OUT/tma-gemm-variants.json
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from packformer.bench.timing import measure
from packformer.ops.gelu import ACTS, _act, bias_act
from packformer.ops.linear_act import linear_act_ref, linear_act_tma, tma_tile


@triton.jit
def _kernel(a_desc, w_desc, c_desc, BIAS, M, N, K, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS, SUBTILE: tl.constexpr, WS: tl.constexpr,
            FLATTEN: tl.constexpr):
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS,
                         flatten=FLATTEN, warp_specialize=WS):
        off_m, off_n, acc = tma_tile(a_desc, w_desc, tile, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc = _act(acc, ACT)
        if SUBTILE:
            a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], a0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BLOCK_N // 2], a1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def run(x, w, b, bm, bn, bk, warps, stages, subtile, ws, flatten=True, persistent=True):
    """gelu(x @ w^T + b) through `_kernel` with the given tiles: x [M, K], w [N, K] -> [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    progs = min(tiles, torch.cuda.get_device_properties(0).multi_processor_count) if persistent else tiles
    _kernel[(progs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                      TensorDescriptor.from_tensor(y, [bm, bn // 2 if subtile else bn]), b, m, n, k, ACT=ACTS["gelu"],
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_PROGRAMS=progs, SUBTILE=subtile, WS=ws,
                      FLATTEN=flatten, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="tma-gemm-variants.json")
    out_path = ap.parse_args().out
    rows = []
    shapes = (("bert FFN1 offline", 35201, 3072, 768), ("modernbert FFN1 (GLU) offline", 35201, 2304, 768),
              ("xlmr FFN1 offline", 35201, 4096, 1024), ("bert FFN1 serve", 2209, 3072, 768))
    # (block_m, block_n, block_k, warps, stages, epilogue in two halves, warp specialization)
    variants = ((128, 256, 64, 8, 3, False, False), (128, 256, 64, 8, 4, True, False),
                (128, 256, 64, 8, 3, True, False), (128, 256, 64, 8, 3, False, True),
                (128, 256, 64, 8, 4, True, True), (128, 128, 64, 8, 4, False, False),
                (128, 128, 64, 4, 4, False, False), (128, 128, 64, 8, 4, False, True),
                (256, 128, 64, 8, 3, False, False), (128, 256, 32, 8, 5, True, False))
    for name, m, n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        w = (torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.03)
        b = torch.randn(n, device="cuda", dtype=torch.float16, generator=g) * 0.1
        want = linear_act_ref(x[:4096], w, b, "gelu").float()
        ways = {"cublas mm": lambda: x @ w.t(),
                "cublas mm + bias_act": lambda: bias_act(x @ w.t(), b, "gelu"),
                "library linear_act_tma": lambda: linear_act_tma(x, w, b, "gelu")}
        for cfg in variants:
            ways["tma %dx%dx%d w%d s%d sub%d ws%d" % cfg] = (lambda cfg=cfg: run(x, w, b, *cfg))
        ways["tma 128x256x64 w8 s3 non-persistent"] = lambda: run(x, w, b, 128, 256, 64, 8, 3, False, False,
                                                                  persistent=False)
        for way, fn in ways.items():
            try:
                t, out = measure(fn, "cuda", iterations=20, warmup=3)
                diff = float("nan") if way == "cublas mm" else (out[:4096].float() - want).abs().max().item()
                tf = 2 * m * n * k / t.median_ms / 1e9
                rows.append({"shape": name, "way": way, "median_ms": t.median_ms, "tflops": tf, "max_abs_diff": diff})
                print(f"{name:30s} {way:40s} {t.median_ms*1e3:8.1f} us {tf:6.0f} TFLOP/s  diff {diff:.1e}", flush=True)
            except Exception as e:
                rows.append({"shape": name, "way": way, "error": repr(e)[:300]})
                print(f"{name:30s} {way:40s} FAILED {repr(e)[:200]}", flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
               "rows": rows}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
