"""`packformer bench`: packformer against the tools a user would run instead, on the standard batches
(packformer.bench.workloads) or your own texts, with the GEMM floor; table, JSON and PNG."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .common import NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE


def add_bench_model_options(p) -> None:
    """MODEL + device/dtype (+ torchtext options): what bench and profile share."""
    p.add_argument("model", nargs="?", default=None,
                   help="model folder, torchtext .pt, or 'random:<preset>' (e.g. random:bert-base, random:xlmr-large); "
                        "default: built-in all-MiniLM-L6-v2")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 on CPU; on CUDA fp16, "
                   "bf16 for the decoder families)")
    p.add_argument("--spm", default=None, help="sentencepiece model for a torchtext .pt checkpoint")
    p.add_argument("--num-heads", type=POSITIVE, default=None, help="attention heads of a torchtext .pt checkpoint")


def source_for(args):
    """args -> what run_bench / run_profile take as `model` (ModelParts when torchtext options are given)."""
    extra = {k: v for k, v in (("spm", args.spm), ("num_heads", args.num_heads)) if v is not None}
    if not extra:
        return args.model
    if not str(args.model or "").endswith((".pt", ".pth")):
        raise ValueError("--spm and --num-heads apply to torchtext .pt checkpoints only")
    from ..loading import load_parts
    return load_parts(args.model, **extra)


def slug(source: str) -> str:
    """A file-name-safe short name of a model source."""
    name = source.split(":", 1)[1] if source.startswith("random:") else Path(source.rstrip("/")).name
    if name == "model" and "minilm" in source.lower():
        name = "all-MiniLM-L6-v2"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def add_parser(sub):
    from ..bench.peers import ALIASES, PEERS
    from ..bench.workloads import ID_WORKLOADS, TEXT_WORKLOADS

    p = sub.add_parser("bench", help="benchmark against transformers, Better Transformer, ONNX Runtime ...",
                       description="Time packformer and its peers on the same weights and the same batches; report "
                                   "medians, tokens/s, ratios to each peer and to the GEMM floor, output agreement.")
    add_bench_model_options(p)
    p.add_argument("--workloads", default="serve_b32",
                   help=f"comma-separated: {', '.join(ID_WORKLOADS)}, {', '.join(TEXT_WORKLOADS)} (default: serve_b32); "
                        "sparse (SPLADE vs SparseEncoder) and bge_m3 (encode_all vs dense vs FlagEmbedding) run apart")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated: {', '.join(PEERS)} (aliases: {', '.join(ALIASES)}); default: the "
                        "device's usual set. packformer always runs")
    p.add_argument("--texts", default=None, help="a file of texts, one per line: an extra end-to-end workload")
    p.add_argument("--batch-size", type=POSITIVE, default=32,
                   help="sequences per padded batch on text workloads (default 32)")
    p.add_argument("--iterations", type=POSITIVE, default=10, help="timed calls per peer and workload (default 10)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                   help="untimed calls first (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--max-seconds", type=NON_NEGATIVE_NUMBER, default=60.0,
                   help="stop a peer's timed calls early (after 3) once they took this long (default 60; 0 = never)")
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--no-floor", action="store_true", help="skip the GEMM floor")
    p.add_argument("--out", default=None, help="folder for bench-<model>-<device>-<dtype>[-<tag>].json and .png")
    p.add_argument("--tag", default=None, help="added to the file names, to keep several runs of one model apart")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of tables")
    return p


def run(args) -> int:
    from ..bench.report import bench_chart, print_bench, write_json
    from ..bench.run import run_bench

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if "rerank" in names:           # a cross-encoder workload: packformer vs CrossEncoder.predict, apart
        from ..bench.rerank import run_rerank_bench
        r = run_rerank_bench(args.model, args.device, args.dtype, args.iterations, args.warmup,
                             args.max_seconds or None, batch_size=args.batch_size, log=None if args.json else print)
        if args.json:
            print(json.dumps(r, indent=1))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"bench-rerank-{r['device'].replace(':', '')}-{r['dtype']}.json").write_text(
                json.dumps(r, indent=1) + "\n")
        names.remove("rerank")
        if not r["agrees"]:
            print("packformer disagreed with CrossEncoder.predict on the rerank workload")
            return 1
        if not names:
            return 0
        args.workloads = ",".join(names)
    from ..bench.outputs import OUTPUT_WORKLOADS, run_output_bench
    if set(args.workloads.split(",")) & set(OUTPUT_WORKLOADS):    # sparse / multi-vector outputs: their own runs
        return run_output_bench(args)
    quiet = args.json
    result = run_bench(source_for(args), workloads=args.workloads, peers=args.peers, device=args.device,
                       dtype=args.dtype, texts=args.texts, iterations=args.iterations, warmup=args.warmup,
                       max_seconds=args.max_seconds or None, batch_size=args.batch_size, floor=not args.no_floor,
                       threads=args.threads, log=None if quiet else print)
    if quiet:
        print(json.dumps(result, indent=1))
    else:
        print()
        print_bench(result)
    if args.out:
        stem = f"bench-{slug(result['model']['source'])}-{result['device'].replace(':', '')}-{result['dtype']}"
        if args.tag:
            stem += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", args.tag)
        j = write_json(result, Path(args.out) / f"{stem}.json")
        png = bench_chart(result, Path(args.out) / f"{stem}.png")
        if not quiet:
            print(f"wrote {j} and {png}")
    pf = [w["peers"].get("packformer", {}) for w in result["workloads"]]
    bad = [w["name"] for w, p in zip(result["workloads"], pf) if p.get("status") != "ok" or not p["agreement"]["agrees"]]
    if bad:
        print(f"packformer failed or disagreed with the reference on: {', '.join(bad)}")
        return 1
    return 0
