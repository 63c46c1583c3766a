"""The rerank workload: one query and 100 passages, scored by packformer's CrossEncoderModel.predict against
sentence-transformers' CrossEncoder.predict (fp32) on the same folder; and bench-serve's rerank mode, which
drives packformer's own POST /rerank.

Passage lengths follow the standard serving distribution (serve_b32's lognormal: median 64 tokens, sigma
0.8, 8 to 512 tokens, seed 0), in words of the end-to-end text vocabulary (one WordPiece token each)."""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .workloads import generate_texts

RERANK_PASSAGES = 100
QUERY = "which river model answers the query about packed batches"


def rerank_workload(n: int = RERANK_PASSAGES, seed: int = 0) -> tuple[str, list[str]]:
    """(query, n passages): lengths from serve_b32's distribution (special tokens and query left out)."""
    g = np.random.default_rng(seed)
    vocab = " ".join(generate_texts(50, seed=7)).split()
    lengths = [int(min(512, max(8, round(math.exp(g.normal(math.log(64), 0.8)))))) for _ in range(n)]
    words = np.random.default_rng(seed + 1)
    return QUERY, [" ".join(words.choice(vocab, size=max(1, k - 3))) for k in lengths]


def minilm_cross_encoder(folder: Path) -> Path:
    """A MiniLM-size cross-encoder (6 layers, 384 hidden, the built-in model's encoder weights under a random
    one-label head) written as a sentence-transformers CrossEncoder folder."""
    from transformers import BertForSequenceClassification

    from ..loading import builtin_model_dir

    src = builtin_model_dir()
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(str(src), num_labels=1).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def run_rerank_bench(model: str | None = None, device: str = "cpu", dtype: str | None = None, iterations: int = 10,
                     warmup: int | None = None, max_seconds: float | None = None, passages: int = RERANK_PASSAGES,
                     batch_size: int = 32, log=print) -> dict:
    """packformer predict() vs CrossEncoder.predict (fp32, batch_size) on one query x `passages` passages.
    model: a cross-encoder folder; None builds the MiniLM-size one in a temporary folder."""
    from sentence_transformers import CrossEncoder

    import packformer
    from ..rerank import CrossEncoderModel
    from .report import machine_info
    from .timing import measure

    log = log or (lambda s: None)
    with tempfile.TemporaryDirectory(prefix="packformer-rerank-") as tmp:
        folder = str(model) if model else str(minilm_cross_encoder(Path(tmp) / "minilm-cross-encoder"))
        pf = packformer.load(folder, device=device, dtype=dtype)
        if not isinstance(pf, CrossEncoderModel):
            raise ValueError(f"{folder} is not a cross-encoder; the rerank workload needs one")
        dev = pf.device
        warmup = (3 if dev.type == "cuda" else 1) if warmup is None else warmup
        query, docs = rerank_workload(passages)
        pairs = [(query, d) for d in docs]
        tokens = sum(map(len, pf.pair_ids(pairs)))
        log(f"packformer bench rerank: {folder} on {dev} ({str(pf.dtype).replace('torch.', '')}), 1 query x "
            f"{len(docs)} passages, {tokens} tokens")
        t_pf, got = measure(lambda: pf.predict(pairs), dev, iterations, warmup, max_seconds)
        log(f"  packformer predict()        {t_pf.median_ms:10.2f} ms")
        ce = CrossEncoder(folder, device=str(dev))
        t_st, want = measure(lambda: ce.predict(pairs, batch_size=batch_size), dev, iterations, warmup, max_seconds)
        log(f"  CrossEncoder.predict fp32   {t_st.median_ms:10.2f} ms (batch_size {batch_size})")
    diff = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
    tol = 1e-4 if pf.dtype == torch.float32 else 1e-2
    same_order = [int(i) for i in np.argsort(-got, kind="stable")[:10]] == \
        [int(i) for i in np.argsort(-want, kind="stable")[:10]]
    ratio = t_st.median_ms / t_pf.median_ms
    log(f"  speedup {ratio:.2f}x, max |score diff| {diff:.2e} (tolerance {tol:g}), top-10 order "
        f"{'equal' if same_order else 'DIFFERS'}")
    return {"schema": "packformer.bench.rerank/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(dev), "model": folder if model else "minilm-size cross-encoder (built-in "
            "encoder, random head)", "device": str(dev), "dtype": str(pf.dtype).replace("torch.", ""),
            "passages": len(docs), "tokens": tokens, "packformer": t_pf.to_dict(),
            "cross_encoder_fp32": {**t_st.to_dict(), "batch_size": batch_size},
            "speedup_of_packformer": float(f"{ratio:.6g}"), "max_abs_score_diff": diff, "tolerance": tol,
            "agrees": diff <= tol, "top10_order_equal": same_order}


def serve_rerank(args) -> int:
    """bench-serve --rerank N: latency and throughput of packformer serve's POST /rerank, each request one
    query x N passages (rerank_workload), at the requested concurrencies."""
    import packformer
    from .loadgen import drive_server

    n = args.rerank
    with tempfile.TemporaryDirectory(prefix="packformer-rerank-") as tmp:
        folder = str(args.model) if args.model else str(minilm_cross_encoder(Path(tmp) / "minilm-cross-encoder"))
        query, docs = rerank_workload(n)
        model = packformer.load(folder)
        tokens = sum(map(len, model.pair_ids([(query, d) for d in docs])))
        del model
        body = [{"query": query, "texts": docs, "truncate": True}]
        drive_server(folder, "/rerank", body, [tokens], args,
                     {"mode": "rerank", "passages": n, "tokens_per_request": tokens},
                     ["--max-client-batch-size", str(max(n, 32))])
    return 0
