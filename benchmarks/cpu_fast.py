"""The CPU fast path timed against its GEMM floor, the reference and the other modes, in one process.

    python benchmarks/cpu_fast.py                                  # minilm-l6, 3 CPU batches, fp32/bf16/int8
    python benchmarks/cpu_fast.py --threads 1 --iters 9            # 1 thread: CPU time ~ work, robust to load
    python benchmarks/cpu_fast.py --models bert-base --workloads serve_b32 --modes fp32 --peers hf_sdpa
    python benchmarks/cpu_fast.py --e2e 1500 --modes fp32,bf16     # encode() vs SentenceTransformer.encode
    python benchmarks/cpu_fast.py --compile-block                  # torch.compile of one layer vs eager fused

Every variant of one batch is timed round-robin (call 1 of each, then call 2 of each, ...), so a busy
neighbour slows all of them alike; reported are the medians of wall time and of process CPU time. On a
shared machine run with --threads 1 and compare CPU times: with one thread, CPU time is the work done,
whatever else runs. Ratios are to the floor measured in the same run and dtype (packformer.bench.floor:
F.linear of the four GEMMs per layer on the real token count). `packformer bench` compares packformer
with other tools; this script compares packformer's own modes (fp32, bf16, int8) within one run, which
`benchmarks/reproduce.sh` records as fastpath-minilm-l6.json and fastpath-e2e-minilm-l6.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Callable

import numpy as np
import torch

import packformer
from packformer.bench.floor import GemmFloor
from packformer.bench.workloads import build_workload, generate_texts
from packformer.fast.cpu_features import detect
from packformer.loading import builtin_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def timed_round_robin(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, dict]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append((time.perf_counter() - t) * 1e3)
            cpu[k].append((time.process_time() - c) * 1e3)
    return {k: {"wall_ms": statistics.median(wall[k]), "wall_min_ms": min(wall[k]),
                "cpu_ms": statistics.median(cpu[k])} for k in fns}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def model_source(name: str) -> str:
    return str(builtin_model_dir()) if name == "minilm-l6" else f"random:{name}"


def bench_batches(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        src = model_source(model_name)
        ref = packformer.load(src, fast=False)
        cfg = ref.config
        for wl_name in args.workloads:
            wl = build_workload(wl_name, cfg)
            batch = wl.packed(cfg.position_offset)
            fns: dict[str, Callable[[], object]] = {}
            outs = {}
            ref_h = ref.hidden_states(batch)
            for mode in args.modes:
                dtype = DTYPES[mode]
                m = packformer.load(src, dtype=None if mode == "int8" else dtype,
                                    quantize="int8" if mode == "int8" else None, threads=args.threads)
                floor_run = GemmFloor(ref.encoder, "cpu", dtype).runner([wl.real_tokens])
                if mode != "int8":
                    fns[f"floor_{mode}"] = lambda r=floor_run: torch.inference_mode()(r)()
                fns[f"fast_{mode}"] = lambda m=m: m.hidden_states(batch)
                outs[f"fast_{mode}"] = m.hidden_states(batch)
            fns["reference_fp32"] = lambda: ref.hidden_states(batch)
            for peer in args.peers:
                fns[peer] = make_peer(peer, ref, wl)
            res = timed_round_robin(fns, args.iters)
            for k, r in res.items():
                mode = k.split("_")[1] if k.startswith(("fast_", "floor_")) else "fp32"
                fl = res.get(f"floor_{mode}") or res.get("floor_fp32")
                r.update(model=model_name, workload=wl_name, tokens=wl.real_tokens, variant=k,
                         x_floor_wall=r["wall_ms"] / fl["wall_ms"] if fl else None,
                         x_floor_cpu=r["cpu_ms"] / fl["cpu_ms"] if fl else None)
                if k in outs:
                    o = outs[k].float()
                    r["max_abs_vs_ref"] = (o - ref_h).abs().max().item()
                    r["min_token_cos_vs_ref"] = torch.nn.functional.cosine_similarity(o, ref_h, dim=1).min().item()
                rows.append(r)
                print(fmt(r), flush=True)
    return rows


def make_peer(name: str, ref, wl) -> Callable[[], object]:
    from packformer.bench.convert import to_hf
    ids, mask = wl.padded(ref.pad_id)
    if name == "hf_sdpa":
        hf = to_hf(ref.encoder, attn_implementation="sdpa").eval()
    elif name == "hf_int8_dynamic":
        hf = torch.ao.quantization.quantize_dynamic(to_hf(ref.encoder, attn_implementation="sdpa").eval(),
                                                    {torch.nn.Linear}, dtype=torch.qint8)
    else:
        raise ValueError(f"unknown peer {name!r}; this script knows hf_sdpa and hf_int8_dynamic")

    def run():
        with torch.inference_mode():
            return hf(input_ids=ids, attention_mask=mask)
    return run


def bench_e2e(args) -> list[dict]:
    from sentence_transformers import SentenceTransformer
    texts = generate_texts(args.e2e)
    rows = []
    path = builtin_model_dir()
    fp32_ref = None
    for mode in args.modes:
        dtype = DTYPES[mode]
        m = packformer.load(path, dtype=None if mode == "int8" else dtype,
                            quantize="int8" if mode == "int8" else None, threads=args.threads)
        fns = {f"packformer_{mode}": lambda m=m: m.encode(texts)}
        if mode != "int8":
            kw = {"model_kwargs": {"dtype": dtype}} if mode == "bf16" else {}
            st = SentenceTransformer(str(path), device="cpu", **kw)
            fns[f"st_{mode}"] = lambda st=st: st.encode(texts, batch_size=32)
        res = timed_round_robin(fns, args.iters, warmup=1)
        if fp32_ref is None:
            fp32_ref = packformer.load(path, fast=False).encode(texts)
        tokens = sum(len(s) for s in m.token_ids(texts))
        for k, r in res.items():
            out = fns[k]()
            c = cosine(np.asarray(out, dtype=np.float32), fp32_ref)
            r.update(variant=k, texts=len(texts), tokens=tokens, tokens_per_s=tokens / r["wall_ms"] * 1e3,
                     min_cos_vs_fp32=float(c.min()), mean_cos_vs_fp32=float(c.mean()))
            rows.append(r)
            print(fmt(r), flush=True)
    return rows


def bench_compile_block(args) -> list[dict]:
    """One MiniLM layer minus attention: eager reference ops vs the fast path's fused linears vs the same
    block under torch.compile (inductor, dynamic T), with the compile time."""
    import torch.nn.functional as F
    from packformer.fast.cpu_linear import make_linear
    m = packformer.load(builtin_model_dir(), fast=False)
    layer, h = m.encoder.layers[0], m.config.hidden_size
    t = build_workload("offline_b128", m.config).real_tokens
    x, a = torch.randn(t, h), torch.randn(t, h)
    n1, n2 = layer.norm1, layer.norm2
    out, f1, f2 = (make_linear(l, torch.float32) for l in (layer.out, layer.ffn1, layer.ffn2))

    def eager(x, a):
        x1 = n1(x + layer.out(a))
        return n2(x1 + layer.ffn2(F.gelu(layer.ffn1(x1))))

    def fused(x, a):
        x1 = F.layer_norm(out(a, residual=x), (h,), n1.weight, n1.bias, n1.eps)
        return F.layer_norm(f2(f1(x1, act="gelu"), residual=x1), (h,), n2.weight, n2.bias, n2.eps)

    with torch.inference_mode():
        compiled = torch.compile(eager, dynamic=True)
        t0 = time.perf_counter()
        compiled(x, a)
        compile_s = time.perf_counter() - t0
        fns = {"eager_ref_ops": lambda: eager(x, a), "fused_linears": lambda: fused(x, a),
               "compiled_inductor": lambda: compiled(x, a)}
        res = timed_round_robin(fns, args.iters)
    rows = []
    for k, r in res.items():
        r.update(variant=k, tokens=t, compile_s=compile_s if k == "compiled_inductor" else None)
        rows.append(r)
        print(fmt(r), flush=True)
    return rows


def fmt(r: dict) -> str:
    keys = ("model", "workload", "variant", "wall_ms", "cpu_ms", "x_floor_wall", "x_floor_cpu", "max_abs_vs_ref",
            "min_token_cos_vs_ref", "tokens_per_s", "min_cos_vs_fp32", "mean_cos_vs_fp32", "compile_s")
    parts = []
    for k in keys:
        v = r.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm-l6", help="comma list: minilm-l6 (real weights), bert-base, ...")
    p.add_argument("--workloads", default="tutorial_big,serve_b32,offline_b128")
    p.add_argument("--modes", default="fp32,bf16,int8", help="comma list of fp32, bf16, int8")
    p.add_argument("--peers", default="", help="comma list: hf_sdpa, hf_int8_dynamic")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: packformer's (physical cores)")
    p.add_argument("--e2e", type=int, default=0, help="end to end: encode() of N generator texts vs sentence-transformers")
    p.add_argument("--compile-block", action="store_true", help="torch.compile of one layer vs the fused eager ops")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    for k in ("models", "workloads", "modes", "peers"):
        setattr(args, k, [s for s in getattr(args, k).split(",") if s])
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
            "cpu": detect().to_dict()}
    print(json.dumps(info), flush=True)
    if args.compile_block:
        rows = bench_compile_block(args)
    elif args.e2e:
        rows = bench_e2e(args)
    else:
        rows = bench_batches(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
