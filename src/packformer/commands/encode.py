"""`packformer encode`: texts -> embeddings, printed as JSON lines or written to .npy / .jsonl."""
from __future__ import annotations

import json
import sys

import numpy as np

from .common import add_model_options, add_text_inputs, load_model, read_texts


def add_parser(sub):
    p = sub.add_parser("encode", help="embed texts", description="Embed texts with a sentence-embedding model.")
    add_model_options(p)
    add_text_inputs(p)
    p.add_argument("--output", "-o", default=None, help="out.npy or out.jsonl (default: JSON lines on stdout)")
    p.add_argument("--normalize", action=argparse_bool(), default=None,
                   help="L2-normalize embeddings (default: as the model folder says)")
    p.add_argument("--batch-size", type=int, default=None, help="max sequences per batch (on top of the token budget)")
    p.add_argument("--task", default=None,
                   help="models with task adapters (jina-embeddings-v3): the task whose LoRA adapter and "
                        "instruction apply, e.g. retrieval.query (default: the base weights)")
    return p


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction


def write_rows(rows: np.ndarray, texts: list[str], output: str | None, key: str) -> None:
    if output and output.endswith(".npy"):
        np.save(output, rows)
        print(f"wrote {rows.shape[0]} x {rows.shape[1]} array to {output}", file=sys.stderr)
        return
    if output and not output.endswith(".jsonl"):
        raise ValueError(f"--output must end in .npy or .jsonl, got {output!r}")
    f = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for t, r in zip(texts, rows):
            f.write(json.dumps({"text": t, key: [round(float(x), 7) for x in r]}) + "\n")
    finally:
        if output:
            f.close()
            print(f"wrote {rows.shape[0]} rows to {output}", file=sys.stderr)


def run(args) -> int:
    texts = read_texts(args)
    model = load_model(args)
    emb = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                       truncate=not args.no_truncate, show_progress_bar=len(texts) > 1000)
    write_rows(emb, texts, args.output, "embedding")
    return 0
