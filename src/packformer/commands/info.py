"""`packformer info`: architecture, parameters, dims, max length, pooling of a model."""
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
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return 0
