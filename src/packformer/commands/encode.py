"""`packformer encode`: texts -> embeddings, printed as JSON lines or written to .npy / .jsonl."""
from __future__ import annotations

import json
import sys

import numpy as np

from ..outputs import PRECISIONS
from .common import POSITIVE, add_model_options, add_text_inputs, load_model, read_texts


def add_parser(sub):
    p = sub.add_parser("encode", help="embed texts", description="Embed texts with a sentence-embedding model.")
    add_model_options(p)
    add_text_inputs(p)
    p.add_argument("--output", "-o", default=None, help="out.npy or out.jsonl (default: JSON lines on stdout)")
    p.add_argument("--normalize", action=argparse_bool(), default=None,
                   help="L2-normalize embeddings (default: as the model folder says)")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="max sequences per batch (on top of the token budget)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--sparse", action="store_true",
                       help="sparse vectors (SPLADE models, bge-m3's lexical weights): per text its nonzero "
                            "[token id, weight] pairs, as JSON lines (SPLADE models give them by default)")
    shape.add_argument("--token-embeddings", action="store_true",
                       help="every token's embedding (no pooling): per text [tokens][hidden], as JSON lines")
    p.add_argument("--task", default=None,
                   help="models with task adapters (jina-embeddings-v3): the task whose LoRA adapter and "
                        "instruction apply, e.g. retrieval.query (default: the base weights)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-name", default=None,
                        help="a prompt of the folder's config_sentence_transformers.json put before every text "
                             "(default: its default_prompt_name, if any)")
    prompt.add_argument("--prompt", default=None, help="a text put before every text (instead of a named prompt)")
    p.add_argument("--truncate-dim", type=POSITIVE, default=None,
                   help="keep the first N dimensions (Matryoshka; default: the folder's truncate_dim, if any)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="float32, or int8/uint8 (ranges from these texts) or binary/ubinary (bit-packed), "
                        "as sentence-transformers quantizes (default: float32)")
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
            vals = r.tolist() if r.dtype.kind in "iu" else [round(float(x), 7) for x in r]   # quantized: ints
            f.write(json.dumps({"text": t, key: vals}) + "\n")
    finally:
        if output:
            f.close()
            print(f"wrote {rows.shape[0]} rows to {output}", file=sys.stderr)


def run_per_text(args, texts: list[str], model) -> int:
    """--sparse / --token-embeddings (and SPLADE models): outputs whose shape varies per text, as JSON lines
    {"text": ..., "sparse": [[token id, weight], ...]} or {"text": ..., "token_embeddings": [[...], ...]}."""
    if args.output and not args.output.endswith(".jsonl"):
        raise ValueError(f"sparse vectors and token embeddings are written as JSON lines: --output must end in "
                         f".jsonl, got {args.output!r}")
    if args.normalize:
        raise ValueError("--normalize applies to dense sentence embeddings, not to --sparse / --token-embeddings")
    kw = dict(batch_size=args.batch_size, truncate=not args.no_truncate, show_progress_bar=len(texts) > 1000)
    if args.token_embeddings:
        key, rows = "token_embeddings", (np.round(r.astype(np.float64), 7).tolist()
                                         for r in model.encode(texts, output_value="token_embeddings", **kw))
    else:
        key, rows = "sparse", ([[i, round(w, 7)] for i, w in row]
                               for row in model.encode_sparse(texts, convert_to_sparse_tensor=False, **kw))
    f = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for t, r in zip(texts, rows):
            f.write(json.dumps({"text": t, key: r}) + "\n")
    finally:
        if args.output:
            f.close()
            print(f"wrote {len(texts)} rows to {args.output}", file=sys.stderr)
    return 0


def run(args) -> int:
    texts = read_texts(args)
    model = load_model(args)
    if args.sparse or args.token_embeddings or "splade" in getattr(model, "outputs", {}):
        return run_per_text(args, texts, model)
    emb = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                       truncate=not args.no_truncate, show_progress_bar=len(texts) > 1000,
                       prompt_name=args.prompt_name, prompt=args.prompt, truncate_dim=args.truncate_dim,
                       precision=args.precision)
    write_rows(emb, texts, args.output, "embedding")
    return 0
