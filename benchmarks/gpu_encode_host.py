"""Where `encode()` spends host time on a GPU machine: tokens/s under several torch CPU-thread counts and
pipeline settings, and the top of a cProfile of one call (main thread).

    PYTHONPATH=src python3 benchmarks/gpu_encode_host.py [--model DIR] [--texts 20000] [--out DIR]

On a GPU the model runs at millions of tokens/s, so `encode()` is bound by the host: tokenization (in a
background thread, the Rust tokenizer on all cores), packing and pinning, launches and read-back.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import torch

import packformer
from packformer.bench.timing import measure
from packformer.bench.workloads import generate_texts
from packformer.pipeline import PipelineConfig, run_texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in all-MiniLM-L6-v2)")
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    texts = generate_texts(args.texts)
    m = packformer.load(args.model, device="cuda")
    n = sum(len(s) for s in m.token_ids(texts))
    res: dict = {"device": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count(), "tokens": n,
                 "torch_threads_default": torch.get_num_threads()}
    t0 = time.perf_counter()
    m.tokenizer.tok.encode_batch_fast(texts)
    res["tokenizer_alone_tok_s"] = round(n / (time.perf_counter() - t0))

    def rate(fn, reps=3):
        t, _ = measure(fn, "cuda", iterations=reps, warmup=1)     # median of `reps` synchronised calls
        return round(n / (t.median_ms * 1e-3))

    default_threads = torch.get_num_threads()
    for threads in (default_threads, 4, 1):
        torch.set_num_threads(threads)
        res[f"encode_tok_s_torch_threads_{threads}"] = rate(lambda: m.encode(texts))
    torch.set_num_threads(default_threads)
    for label, cfg in (("prefetch4_inflight8", PipelineConfig(512, 8192, 4, 8)),
                       ("chunk16384", PipelineConfig(1024, 16384, 2, 4))):
        res[f"encode_tok_s_{label}"] = rate(lambda: run_texts(m, texts, lambda b: m.embed_batch(b), m.dim, config=cfg))
    null = lambda b: torch.zeros(len(b.cu_seqlens) - 1, m.dim)            # noqa: E731  the host alone
    res["pipeline_without_model_tok_s"] = rate(lambda: run_texts(m, texts, null, m.dim))
    c0, t = time.process_time(), time.perf_counter()
    m.encode(texts)
    res["encode_cpu_s_per_call"] = round(time.process_time() - c0, 3)
    res["encode_wall_s_per_call"] = round(time.perf_counter() - t, 3)
    prof = cProfile.Profile()
    prof.enable()
    m.encode(texts)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    res["cprofile_top_tottime"] = buf.getvalue().splitlines()[:60]
    print(json.dumps({k: v for k, v in res.items() if k != "cprofile_top_tottime"}, indent=1))
    print("\n".join(res["cprofile_top_tottime"]))
    Path(args.out, "gpu_encode_host.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
