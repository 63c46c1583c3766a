"""Pure conversions between model outputs and API payloads (numpy only; no HTTP, no torch)."""
from __future__ import annotations

import base64
from typing import Sequence

import numpy as np


def to_base64(vec: np.ndarray) -> str:
    """One embedding as OpenAI sends it with encoding_format="base64": little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


def from_base64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


def shorten(emb: np.ndarray, dimensions: int) -> np.ndarray:
    """[N, D] -> [N, dimensions]: keep the leading dimensions and L2-renormalize each row.

    This is OpenAI's `dimensions` behaviour for its Matryoshka-trained text-embedding-3 models. It is
    meaningful for Matryoshka-trained encoders; for others the shortened vectors lose more accuracy,
    but the operation is the same. A zero row stays zero.
    """
    if not 1 <= dimensions <= emb.shape[1]:
        raise ValueError(f"dimensions must be between 1 and the model's {emb.shape[1]}, got {dimensions}")
    cut = emb[:, :dimensions].astype(np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms > 0, norms, 1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predictions(logits: np.ndarray, labels: Sequence[str], raw_scores: bool = False) -> list[list[dict]]:
    """[N, C] logits -> per input, every label with its score (softmax unless raw_scores), best first
    (TEI's /predict order)."""
    scores = logits if raw_scores else softmax(logits)
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        out.append([{"label": labels[j], "score": float(row[j])} for j in order])
    return out


def special_wrap(empty_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts around a text, read from its encoding of "" (e.g. [CLS] [SEP]
    -> ([101], [102]); <s> </s> -> ([0], [2])): one leading token, the rest trailing."""
    empty_ids = list(empty_ids)
    return empty_ids[:1], empty_ids[1:]


def wrap_token_ids(seqs: Sequence[Sequence[int]], prefix: Sequence[int], suffix: Sequence[int],
                   vocab_size: int, max_length: int, truncate: bool) -> list[list[int]]:
    """Pre-tokenized inputs (no special tokens, like tiktoken output for OpenAI) -> model ids with the
    special tokens added, so that a text's ids give the same embedding as the text itself.

    Raises ValueError naming the input for ids outside the vocabulary, and for an over-long input
    unless truncate (which keeps the leading ids and the special tokens, like the tokenizer does)."""
    room = max_length - len(prefix) - len(suffix)
    out = []
    for i, s in enumerate(seqs):
        bad = [t for t in s if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"input[{i}] has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(s) > room:
            if not truncate:
                raise OverflowError(f"input[{i}] has {len(s) + len(prefix) + len(suffix)} tokens with special "
                                    f"tokens, more than the model's maximum of {max_length}")
            s = s[:room]
        out.append([*prefix, *s, *suffix])
    return out
