"""`packformer tutorial`: PyTorch's Better Transformer tutorial as one command, packformer beside it."""
from __future__ import annotations

import json
from pathlib import Path

from .common import NON_NEGATIVE, POSITIVE


def add_parser(sub):
    p = sub.add_parser("tutorial", help="reproduce the Better Transformer tutorial, packformer beside it",
                       description="XLM-R large + a 2-class head on the tutorial's small and big batches: slow path, "
                                   "Better Transformer fast path with sparsity off and on, packformer padded and "
                                   "packed; on the CPU, then on --device. Profiler tables, then a summary.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the CPU always runs first; default: cpu)")
    p.add_argument("--iterations", type=POSITIVE, default=10, help="timed iterations per run (default 10, as the tutorial)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="untimed iterations before each run (default 1)")
    p.add_argument("--checkpoint", default=None, help="torchtext xlmr.large.encoder.pt (default: random weights)")
    p.add_argument("--spm", default=None, help="xlmr.sentencepiece.bpe.model (default: the built-in WordPiece)")
    p.add_argument("--shape", default="xlmr-large",
                   help="preset shape of the random weights (default xlmr-large; minilm-l6 or bert-base run faster)")
    p.add_argument("--dtype", default="float32", help="dtype on --device cuda (default float32, as the tutorial)")
    p.add_argument("--profile-iterations", type=NON_NEGATIVE, default=1,
                   help="iterations under the torch profiler per run (0: no profiler tables; default 1)")
    p.add_argument("--top", type=POSITIVE, default=10, help="operators per profiler table (default 10)")
    p.add_argument("--out", default=None, help="folder for tutorial-<device>[-<dtype>].json and .png")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of tables")
    return p


def run(args) -> int:
    from ..bench.report import write_json
    from ..bench.tutorial import run_tutorial, tutorial_chart

    result = run_tutorial(device=args.device, iterations=args.iterations, checkpoint=args.checkpoint, spm=args.spm,
                          shape=args.shape, dtype=args.dtype, warmup=args.warmup,
                          profile_iterations=args.profile_iterations, top=args.top,
                          log=None if args.json else print)
    if args.json:
        print(json.dumps(result, indent=1))
    if args.out:
        dev = args.device.split(":")[0]
        if dev != "cpu" and args.dtype not in ("float32", "fp32"):
            dev += f"-{args.dtype}"
        j = write_json(result, Path(args.out) / f"tutorial-{dev}.json")
        png = Path(args.out) / f"tutorial-{dev}.png"
        tutorial_chart(result, png)
        if not args.json:
            print(f"wrote {j} and {png}")
    bad = [f"{r['device']}/{r['batch']}/{r['run']}" for r in result["results"] if not r["agreement"]["agrees"]]
    if bad:
        print(f"outputs disagree with the slow path: {', '.join(bad)}")
        return 1
    return 0
