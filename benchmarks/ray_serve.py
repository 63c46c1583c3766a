"""`packformer serve --ray` against the single-process server, same model, same load, one machine.

    PYTHONPATH=src python3 benchmarks/ray_serve.py [--model DIR] --device cuda [--replicas 2] [--out DIR]

Runs `packformer bench-serve` (one text per request, concurrency 1 and 64) against, in turn:
  single         `packformer serve`
  proxy-1        `serve --ray`, one replica behind Ray Serve's Python proxy
  haproxy-1      `serve --ray --ingress haproxy`, one replica (requests go straight to its port)
  haproxy-N      the same with N replicas sharing the device (GPUs per replica 1/N on one GPU)
and writes one JSON holding each run's bench-serve result, plus a table of tokens/s, requests/s and
p50/p99 with each run's ratio to the single-process server. The load generator shares the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packformer.bench.report import table, write_json


def configs(replicas: int, gpu: bool) -> dict[str, list[str]]:
    share = [f"--gpus-per-replica={1 / replicas:g}"] if gpu else []
    return {"single": [], "proxy-1": ["--ray"], "haproxy-1": ["--ray", "--ingress=haproxy"],
            f"haproxy-{replicas}": ["--ray", "--ingress=haproxy", f"--replicas={replicas}", *share]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in all-MiniLM-L6-v2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--replicas", type=int, default=2, help="replicas of the last run (default: 2)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (default: 2000)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of the JSON result")
    args = ap.parse_args()
    runs, work = {}, Path(tempfile.mkdtemp(prefix="packformer-ray-serve-"))
    for i, (name, server_args) in enumerate(configs(args.replicas, args.device.startswith("cuda")).items()):
        path = work / f"{name}.json"
        cmd = [sys.executable, "-m", "packformer", "bench-serve", *([args.model] if args.model else []),
               "--device", args.device, "--concurrency", *map(str, args.concurrency), "--requests", str(args.requests),
               "--duration", "30", "--no-baseline", "--output", str(path), *(["--no-offline"] if i else []),
               *(f"--server-arg={a}" for a in server_args)]
        print(f"== {name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode != 0 or not path.exists():
            print(f"   {name} failed", file=sys.stderr)
            continue
        runs[name] = json.loads(path.read_text())
    if not runs:
        return 1
    first = next(iter(runs.values()))
    result = {"machine": first["machine"], "note": args.note, "model": first["model"], "device": first["device"],
              "dtype": first["dtype"], "runs": runs}
    rows = []
    base = runs.get("single", {}).get("serve", {})
    for name, r in runs.items():
        for c, d in r["serve"].items():
            ref = base.get(c, {}).get("tokens_per_s")
            rows.append([name, int(c), d["tokens_per_s"], d["requests_per_s"], d["p50_ms"], d["p99_ms"],
                         d["tokens_per_s"] / ref if ref else None])
    table(f"packformer serve on Ray vs one process, {result['device']} {result['dtype']}",
          ["server", "clients", "tokens/s", "requests/s", "p50 ms", "p99 ms", "x single"], rows)
    label = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_json(result, Path(args.out) / f"bench-serve-ray-{label}.json")
    print(f"wrote {path}", file=sys.stderr)
    return 0 if len(runs) == len(configs(args.replicas, True)) else 1


if __name__ == "__main__":
    sys.exit(main())
