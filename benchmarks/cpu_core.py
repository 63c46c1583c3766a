"""Issue 3's CPU benchmark: packformer vs transformers+SDPA, Better Transformer (nested) and the GEMM
floor on the standard CPU batches of ../shared/WORKLOADS.md, as ratios measured in one run.

    python benchmarks/cpu_core.py                       # record: JSON in benchmarks/results/
    python benchmarks/cpu_core.py --iterations 2 --no-save   # a quick look

Batches: minilm-l6 (the built-in all-MiniLM-L6-v2, real weights): tutorial_big, serve_b32, offline_b128;
bert-base (random weights): tutorial_big, serve_b32. A thin wrapper over packformer.bench.run_bench; the
JSON it writes holds every timing, the machine, and the output agreement of each peer.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from packformer.bench import run_bench
from packformer.bench.report import print_bench, table, write_json

RUNS = [
    ("minilm-l6", None, "tutorial_big,serve_b32,offline_b128"),
    ("bert-base", "random:bert-base", "tutorial_big,serve_b32"),
]
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="hf_sdpa,bt_nested", help="peers besides packformer (default hf_sdpa,bt_nested)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on one peer's timed calls per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)

    results = {}
    for shape, model, workloads in RUNS:
        r = run_bench(model, workloads=workloads, peers=args.peers, device="cpu", dtype=args.dtype,
                      iterations=args.iterations, max_seconds=args.max_seconds, threads=args.threads)
        print_bench(r)
        results[shape] = r

    peers = [n for n in next(iter(results.values()))["peers_requested"] if n != "packformer"]
    rows = []
    for shape, r in results.items():
        for w in r["workloads"]:
            pf = w["peers"]["packformer"]
            row = [f"{shape} / {w['name']}", f"{100 * w['pad_fraction']:.0f}%", pf["timing"].get("median_ms")]
            row += [w["peers"].get(n, {}).get("speedup_of_packformer") for n in peers]
            row += [pf.get("x_floor_real"), pf.get("x_floor_padded"), pf["agreement"]["agrees"]]
            rows.append(row)
    table(f"packformer on CPU ({args.dtype}): speedup over each peer (peer ms / packformer ms), and packformer's "
          "time in units of the GEMM floor", ["batch", "pad", "packformer ms", *(f"vs {n}" for n in peers),
                                               "x floor real", "x floor padded", "agrees"], rows)
    if not args.no_save:
        machine = next(iter(results.values()))["machine"]
        cpu = re.sub(r"[^A-Za-z0-9]+", "-", machine["cpu"]).strip("-").lower() or "cpu"
        path = write_json({"schema": "packformer.cpu_core/1", "runs": results},
                          Path(args.out) / f"cpu_core-{cpu}-{machine['torch_threads']}t-{args.dtype}.json")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
