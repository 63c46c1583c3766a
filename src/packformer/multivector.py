"""Multi-vector outputs: each text's token vectors, straight off the packed rows [T, H].

A packed batch holds no padding, so a text's token embeddings are a contiguous slice of the rows
(`cu_seqlens[i]:cu_seqlens[i+1]`): nothing to mask or strip. ColBERT vectors (bge-m3's colbert_linear) are
the rows after each sequence's first, projected and normalized. `encode_all` gives bge-m3's three outputs
(dense, lexical weights, ColBERT) from one forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tokenize import check_texts

if TYPE_CHECKING:
    from .batch import PackedBatch
    from .engine import Model

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")


class ColbertHead(nn.Module):
    """bge-m3's colbert_linear on every token but the first ([CLS] / <s>), then L2-normalized:
    [T, H] -> [T - B, D], as FlagEmbedding's _colbert_embedding + _process_colbert_vecs."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, dim)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        keep[cu_seqlens[:-1].long()] = False                       # each sequence's first token
        return F.normalize(self.linear(hidden[keep].float()), p=2.0, dim=-1)


def place_outputs(outputs: dict[str, nn.Module], device: torch.device, dtype: torch.dtype) -> nn.ModuleDict:
    """The model's extra output heads on its device: fp32 like the other heads, except those that say
    `in_model_dtype` (the SPLADE MLM head, as large as a couple of encoder layers)."""
    return nn.ModuleDict({k: m.to(device, dtype if getattr(m, "in_model_dtype", False) else torch.float32).eval()
                          for k, m in (outputs or {}).items()})


def split_rows(rows: torch.Tensor, lengths: Sequence[int]) -> list[np.ndarray]:
    """[sum(lengths), D] -> one fp32 numpy array [Li, D] per sequence."""
    host = rows.float().cpu().numpy()
    bounds = np.cumsum([0, *lengths])
    return [host[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def collect_texts(model: "Model", texts: list[str], fn: Callable[["PackedBatch"], Sequence[Any]], *,
                  batch_size: int | None = None, truncate: bool = True,
                  show_progress_bar: bool | None = None) -> list[Any]:
    """texts -> fn(batch) (one result per sequence, in the batch's order) for every packed batch -> one
    result per text, in input order. The encode() pipeline (tokenization overlapping the model's work)."""
    from .pipeline import run_texts

    out: list[Any] = [None] * len(texts)

    def sink(results: Sequence[Any], index: list[int]) -> None:
        for i, r in zip(index, results):
            out[i] = r

    run_texts(model, texts, fn, 0, batch_size=batch_size, truncate=truncate, show_progress_bar=show_progress_bar,
              sink=sink)
    return out


# ---- token embeddings -------------------------------------------------------------------------------
@torch.inference_mode()
def token_embeddings_batch(model: "Model", batch: "PackedBatch", task: str | None = None) -> list[np.ndarray]:
    """PackedBatch -> each sequence's hidden states [Li, H] fp32, in the batch's order."""
    h = model.hidden_states(batch, task)
    return split_rows(h, batch.seqlens.tolist())


def encode_tokens(model: "Model", texts: str | Sequence[str], batch_size: int | None = None,
                  convert_to_numpy: bool = True, convert_to_tensor: bool = False, truncate: bool = True,
                  show_progress_bar: bool | None = None, task: str | None = None, prompt: str | None = None,
                  prompt_name: str | None = None):
    """Texts -> one [Li, H] array per text (its tokens' hidden states, special tokens and the prompt
    included), as SentenceTransformer.encode(output_value="token_embeddings"); a single str gives one array."""
    single = isinstance(texts, str)
    task = model.resolve_task(task)
    texts = model.with_instruction(texts, task, prompt, prompt_name)
    out = collect_texts(model, texts, lambda b: token_embeddings_batch(model, b, task), batch_size=batch_size,
                        truncate=truncate, show_progress_bar=show_progress_bar)
    if convert_to_tensor or not convert_to_numpy:
        out = [torch.from_numpy(a) for a in out]
    return out[0] if single else out


def encode_output(model: "Model", texts, output_value: str, *, normalize_embeddings: bool | None = None,
                  convert_to_sparse_tensor: bool = True, max_active_dims: int | None = None,
                  convert_to_numpy: bool = True, convert_to_tensor: bool = False, task: str | None = None, **kw):
    """Model.encode for outputs other than a pooled dense vector: token embeddings, or a SPLADE model's
    sparse vectors (its sentence embedding)."""
    from .sparse import encode_sparse, sparse_kind

    if output_value not in OUTPUT_VALUES:
        raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
    if normalize_embeddings:
        raise ValueError("normalize_embeddings applies to dense sentence embeddings; "
                         f"{'token embeddings' if output_value == 'token_embeddings' else 'SPLADE vectors'} "
                         "are returned as the model makes them")
    if output_value == "token_embeddings":
        if max_active_dims is not None:
            raise ValueError("max_active_dims applies to sparse vectors, not to token embeddings")
        return encode_tokens(model, texts, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor,
                             task=task, **kw)
    if sparse_kind(model) != "splade":
        raise ValueError(f"max_active_dims applies to sparse (SPLADE) models; model {model.source} gives dense "
                         "sentence embeddings")
    if task is not None:
        model.resolve_task(task)                                    # raises: SPLADE folders have no adapters
    return encode_sparse(model, texts, convert_to_sparse_tensor=convert_to_sparse_tensor,
                         max_active_dims=max_active_dims, **kw)


# ---- ColBERT and all three outputs -------------------------------------------------------------------
def require_colbert(model: "Model") -> nn.Module:
    outs = getattr(model, "outputs", None)
    head = outs["colbert"] if outs is not None and "colbert" in outs else None
    if head is None:
        raise ValueError(f"model {model.source} has no ColBERT output: load a bge-m3 folder (colbert_linear.pt)")
    return head


@dataclass
class AllOutputs:
    """bge-m3's three outputs of the same texts, from one forward."""

    dense: np.ndarray                   # [N, D] fp32 (CLS pooling, normalized)
    sparse: list[dict[int, float]]      # per text: token id -> lexical weight
    colbert: list[np.ndarray]           # per text: [Li - 1, D'] fp32, normalized

    def __getitem__(self, key: str):
        return getattr(self, key)


@torch.inference_mode()
def all_batch(model: "Model", batch: "PackedBatch") -> list[tuple[np.ndarray, dict[int, float], np.ndarray]]:
    """PackedBatch -> per sequence (dense [D], lexical weights {id: w}, ColBERT [L-1, D']) from one forward."""
    from .sparse import sparse_from_hidden

    colbert = require_colbert(model)
    h = model.hidden_states(batch)
    cu = batch.cu_seqlens.to(h.device, non_blocking=True)
    dense = model.pooler(h, cu).float().cpu().numpy()
    sparse = sparse_from_hidden(model, h, batch)
    vecs = split_rows(colbert(h, cu), [n - 1 for n in batch.seqlens.tolist()])
    return [(d, dict(zip(ids.tolist(), w.tolist())), c) for d, (ids, w), c in zip(dense, sparse, vecs)]


def encode_all(model: "Model", texts: str | Sequence[str], batch_size: int | None = None, truncate: bool = True,
               show_progress_bar: bool | None = None) -> AllOutputs:
    """Texts -> dense, sparse (lexical weights) and ColBERT outputs of one forward, in input order (bge-m3).
    A single str gives dense [D], one dict and one [L-1, D'] array."""
    require_colbert(model)
    from .sparse import require_sparse

    require_sparse(model)
    single = isinstance(texts, str)
    texts = check_texts(texts)
    rows = collect_texts(model, texts, lambda b: all_batch(model, b), batch_size=batch_size, truncate=truncate,
                         show_progress_bar=show_progress_bar)
    dense = np.stack([r[0] for r in rows]) if rows else np.zeros((0, model.dim), np.float32)
    out = AllOutputs(dense, [r[1] for r in rows], [r[2] for r in rows])
    if single:
        return AllOutputs(out.dense[0], out.sparse[0], out.colbert[0])
    return out
