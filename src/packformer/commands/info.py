"""`packformer info`: architecture, parameters, weight memory, dims, max length, pooling of a model."""
from __future__ import annotations

import json

from .common import add_model_options, load_model


def add_parser(sub):
    p = sub.add_parser("info", help="describe a model", description="Describe a model: architecture, sizes, pooling.")
    add_model_options(p, positional=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    info = load_model(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            if k == "memory_bytes":
                print(f"{k:<{width}}  {v:,} ({human_bytes(v)})")
            elif isinstance(v, int) and not isinstance(v, bool):
                print(f"{k:<{width}}  {v:,}")
            else:
                print(f"{k:<{width}}  {v}")
    return 0


def human_bytes(n: int) -> str:
    """1234567890 -> '1.15 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
