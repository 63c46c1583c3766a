"""`packformer profile`: torch profiler tables for one batch (top operators by self time), per peer,
and a Chrome trace on request; `--breakdown`: time by kernel category, against the GEMM floor."""
from __future__ import annotations

import json
from pathlib import Path

from .bench import add_bench_model_options, source_for
from .common import NON_NEGATIVE, POSITIVE


def add_parser(sub):
    from ..bench.workloads import ID_WORKLOADS

    p = sub.add_parser("profile", help="torch profiler tables for one batch",
                       description="Profile one standard batch through packformer (and any peer): top operators "
                                   "by self time; a Chrome trace with --trace; with --breakdown, ms per forward by "
                                   "kernel category per peer, against the GEMM floor (peer 'floor').")
    add_bench_model_options(p)
    p.add_argument("--workload", default="serve_b32", help=f"one of {', '.join(ID_WORKLOADS)} (default serve_b32)")
    p.add_argument("--peers", default="packformer",
                   help="comma-separated peers to profile (default packformer; e.g. packformer,packformer_ref,"
                        "bt_nested); 'floor' is the GEMM floor on the workload's real token counts, launched eagerly, "
                        "'floor_fp8' the same GEMMs in e4m3")
    p.add_argument("--iterations", type=POSITIVE, default=3, help="profiled calls (default 3)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="unprofiled calls first (default 1)")
    p.add_argument("--top", type=POSITIVE, default=25, help="operators per table (default 25)")
    p.add_argument("--trace", default=None, help="write a Chrome trace here (several peers: trace.<peer>.json)")
    p.add_argument("--breakdown", action="store_true",
                   help="after the tables, one table of ms per forward by kernel category per peer, with the wall "
                        "time without the profiler and each peer's GEMM time over the floor's (with peer 'floor')")
    p.add_argument("--eager", action="store_true",
                   help="packformer peers run without CUDA graphs, so that each kernel shows (default: as served)")
    p.add_argument("--out", default=None, help="folder for profile-<workload>-<device>.json")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of tables")
    return p


def run(args) -> int:
    from ..bench.profile import run_profile
    from ..bench.report import print_breakdown, write_json

    result = run_profile(source_for(args), device=args.device, dtype=args.dtype, workload=args.workload,
                         peers=args.peers, iterations=args.iterations, warmup=args.warmup, top=args.top,
                         trace=args.trace, breakdown=args.breakdown, eager=args.eager,
                         log=None if args.json else print)
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.breakdown:
        print()
        print_breakdown(result)
    if args.out:
        j = write_json(result, Path(args.out) / f"profile-{args.workload}-{result['device'].replace(':', '')}.json")
        if not args.json:
            print(f"wrote {j}")
    return 0 if any(p["status"] == "ok" for p in result["peers"].values()) else 1
