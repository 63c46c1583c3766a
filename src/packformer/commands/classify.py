"""`packformer classify`: texts -> labels and scores (softmax over the logits)."""
from __future__ import annotations

import json
import sys

import numpy as np

from .common import add_model_options, add_text_inputs, load_model, read_texts
from .encode import write_rows


def add_parser(sub):
    p = sub.add_parser("classify", help="classify texts",
                       description="Classify texts with a *ForSequenceClassification or torchtext-head model.")
    add_model_options(p)
    add_text_inputs(p)
    p.add_argument("--output", "-o", default=None, help="out.npy (logits) or out.jsonl (default: JSON lines on stdout)")
    p.add_argument("--raw-scores", action="store_true", help="print logits instead of softmax scores")
    return p


def run(args) -> int:
    texts = read_texts(args)
    model = load_model(args)
    logits = model.classify(texts, truncate=not args.no_truncate, show_progress_bar=len(texts) > 1000)
    if args.output and args.output.endswith(".npy"):
        write_rows(logits, texts, args.output, "logits")
        return 0
    scores = logits if args.raw_scores else _softmax(logits)
    labels = model.config.labels()
    f = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for t, s in zip(texts, scores):
            best = int(np.argmax(s))
            f.write(json.dumps({"text": t, "label": labels[best],
                                "scores": {lab: round(float(v), 6) for lab, v in zip(labels, s)}}) + "\n")
    finally:
        if args.output:
            f.close()
    return 0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
