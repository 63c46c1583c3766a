"""`packformer embed-dataset` on Ray against a single-process `encode()` of the same rows, same device.

    PYTHONPATH=src python3 benchmarks/ray_dataset.py [--model DIR] --device cuda --rows 200000 \
        --configs 1x1,2x0.5 [--out DIR]

Writes a Parquet of `--rows` WORKLOADS texts (bench.workloads.generate_texts: ids 0..N-1, row groups of
10,000), then, in this order and on the same machine:
  1. single process: load the model, read the Parquet, `encode()` every text, write one Parquet of
     (id, embedding); each step timed (the model's rate is rows / encode seconds);
  2. `embed_dataset` once per config `RxG[:S]` (R replicas of G GPUs each, each working on S shards
     at once; `1x0` on CPU), into a fresh folder, with its summary's phases: Ray start, replica start,
     model load, CUDA graph capture, read,
     encode, time waiting for the tokenizer, Arrow conversion + write, final checks.
Every run is checked: rows in = rows out, every id once, embeddings against the single process's
(max |diff|, min cosine). Prints a table and writes `ray-dataset-<device>.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import packformer
from packformer.bench.report import machine_info, table, write_json
from packformer.bench.workloads import generate_texts
from packformer.ray import embed_dataset


def parse_configs(text: str) -> list[tuple[int, float, int | None]]:
    """'1x1:1,2x0.5' -> [(1, 1.0, 1), (2, 0.5, None)]: replicas x GPUs per replica [: shards each works
    on at once; None: embed_dataset's default]."""
    out = []
    for part in text.split(","):
        spec, _, k = part.strip().partition(":")
        r, _, g = spec.partition("x")
        out.append((int(r), float(g or 0), int(k) if k else None))
    return out


def write_input(path: Path, rows: int, seed: int) -> list[str]:
    texts = generate_texts(rows, seed)
    pq.write_table(pa.table({"id": np.arange(rows, dtype=np.int64), "text": texts}), path, row_group_size=10_000)
    return texts


def single_process(model_arg, path: Path, out: Path, device: str, dtype: str | None) -> tuple[dict, np.ndarray]:
    """Load, read, encode, write in this process: -> (seconds per step and rates, embeddings [N, D])."""
    t = {}
    t0 = time.perf_counter()
    model = packformer.load(model_arg, device=device, dtype=dtype)
    t["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table_in = pq.read_table(path, columns=["id", "text"])
    texts = table_in.column("text").to_pylist()
    t["read_s"] = time.perf_counter() - t0
    model.encode(texts[:20_000])                    # kernels compiled and graphs captured for these shapes
    t0 = time.perf_counter()
    emb = model.encode(texts)                                                            # [N, D]
    t["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    pq.write_table(pa.table({"id": table_in.column("id"), "embedding": col}), out)
    t["write_s"] = time.perf_counter() - t0
    n = len(texts)
    t["rows_per_s_encode"] = n / t["encode_s"]
    t["rows_per_s_read_encode_write"] = n / (t["read_s"] + t["encode_s"] + t["write_s"])
    t["device"], t["dtype"] = str(model.device), str(model.dtype).replace("torch.", "")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return t, emb


def check_output(folder: Path, ref: np.ndarray) -> dict:
    """Rows in = rows out, each id once, and the embeddings against the single process's."""
    tbl = pq.read_table(folder)
    ids = tbl.column("id").to_numpy()
    emb = np.stack(tbl.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)   # [N, D]
    complete = len(ids) == len(ref) and np.array_equal(np.sort(ids), np.arange(len(ref)))
    r = ref[ids] if complete else ref[: len(ids)]
    cos = np.sum(emb * r, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(r, axis=1) + 1e-30)
    return {"rows_out": int(len(ids)), "ids_complete": bool(complete),
            "max_abs_diff": float(np.abs(emb - r).max()), "min_cosine": float(cos.min())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in all-MiniLM-L6-v2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--configs", default=None,
                    help="RxG[:S],...: replicas x GPUs each [: shards each replica works on at once] "
                         "(default: 1x1:1,1x1,2x0.5 on a GPU, 1x0 on CPU)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default=None, help="folder for the input and outputs (default: a temporary one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of the JSON result")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. where the weights came from)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    configs = parse_configs(args.configs or ("1x1:1,1x1,2x0.5" if cuda else "1x0"))
    work = Path(args.work or tempfile.mkdtemp(prefix="packformer-ray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "input.parquet"
    write_input(src, args.rows, args.seed)
    single, ref = single_process(args.model, src, work / "single.parquet", args.device, args.dtype)
    print(f"single process: encode {single['rows_per_s_encode']:,.0f} rows/s "
          f"(load {single['load_s']:.1f} s, read {single['read_s']:.2f} s, encode {single['encode_s']:.2f} s, "
          f"write {single['write_s']:.2f} s)", file=sys.stderr)
    runs = []
    for replicas, gpus, per_replica in configs:
        name = f"{replicas}x{gpus:g}" + (f":{per_replica}" if per_replica else "")
        out = work / f"out-{name.replace(':', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        _, s = embed_dataset(src, out, args.model, replicas=replicas, gpus_per_replica=gpus, dtype=args.dtype,
                             rows_per_shard=args.rows_per_shard, progress=False, shards_per_replica=per_replica)
        print(f"{name}: {s}", file=sys.stderr)
        runs.append({"config": name, "replicas": replicas, "gpus_per_replica": gpus,
                     "shards_per_replica": per_replica, "summary": s.to_dict(),
                     "check": check_output(out, ref),
                     "rows_per_s_vs_single_encode": s.rows_per_s / single["rows_per_s_encode"],
                     "steady_rows_per_s_vs_single_encode": s.steady_rows_per_s / single["rows_per_s_encode"]})
    tokens = runs[0]["summary"]["tokens"] if runs else None
    result = {"machine": machine_info(args.device), "note": args.note,
              "model": str(args.model or "built-in all-MiniLM-L6-v2"),
              "device": single["device"], "dtype": single["dtype"], "rows": args.rows, "tokens": tokens,
              "rows_per_shard": args.rows_per_shard, "single_process": single, "runs": runs}
    rows = [["single process encode()", 1, single["rows_per_s_encode"], None, 1.0, None, None, None, None, True, None]]
    for r in runs:
        s, p, c = r["summary"], r["summary"]["phases"], r["check"]
        rows.append([f"embed-dataset {r['config']}", r["replicas"], s["rows_per_s"],
                     s["steady_rows_per_s"], r["rows_per_s_vs_single_encode"], r["steady_rows_per_s_vs_single_encode"],
                     p["first_shard_s"], p["model_load_s"], p["write_s"], c["ids_complete"], c["min_cosine"]])
    table(f"embed-dataset vs encode(), {args.rows:,} rows, {result['device']} {result['dtype']}",
          ["run", "replicas", "rows/s", "steady rows/s", "x single", "steady x single", "first shard s",
           "model load s", "write s", "rows+ids ok", "min cos"], rows)
    label = "cuda" if cuda else "cpu"
    path = write_json(result, Path(args.out) / f"ray-dataset-{label}.json")
    print(f"wrote {path}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["check"]["ids_complete"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
