"""Sparse outputs on packed hidden states [T, H]: SPLADE and bge-m3's lexical weights.

SPLADE (sentence-transformers' SparseEncoder: MLMTransformer + SpladePooling) runs the masked-LM head on
each token's row, then log(1 + relu(logits)) and a max or sum over the sequence's tokens. Packed rows need
no attention mask: each sequence's tokens are contiguous, so pooling is a segment reduction over
`cu_seqlens`, and the [T, V] logits are made a block of tokens at a time (never [B, L, V]).

bge-m3 (FlagEmbedding's BGEM3FlagModel) gives each token one weight, relu(sparse_linear(h)), and keeps per
sequence the largest weight of each token id, special tokens (cls, eos, pad, unk) left out.

A sparse result per text is a pair (token ids [k] int64 ascending, weights [k] fp32), zeros dropped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from .heads import segment_ids
from .model import activation

if TYPE_CHECKING:
    from .batch import PackedBatch
    from .engine import Model

SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")
LOGIT_BLOCK_ELEMENTS = 1 << 25        # [rows, V] logits made at a time: 128 MiB in fp32

SparseRow = tuple[np.ndarray, np.ndarray]          # (token ids [k] int64 ascending, weights [k] fp32)


class MLMHead(nn.Module):
    """The masked-LM head of BERT (cls.predictions), RoBERTa/XLM-R (lm_head) and DistilBERT (vocab_*):
    dense -> act -> LayerNorm -> decoder [V, H] (tied to the word embeddings in most checkpoints) + bias."""

    def __init__(self, hidden: int, vocab: int, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.act = act
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(activation(self.act, self.dense(x))))              # [t, V]


class SpladeHead(nn.Module):
    """MLM logits -> log(1 + relu) (twice for "log1p_relu") -> max or sum over each sequence: [B, V] fp32.
    `max_active_dims` keeps each vector's largest weights only (SparseEncoder's option of that name)."""

    in_model_dtype = True                    # the [H, V] decoder costs about two BERT layers: run it like them

    def __init__(self, mlm: MLMHead, pooling: str = "max", act: str = "relu", max_active_dims: int | None = None):
        super().__init__()
        if pooling not in SPLADE_POOLING:
            raise ValueError(f"SPLADE pooling_strategy must be one of {SPLADE_POOLING}, got {pooling!r}")
        if act not in SPLADE_ACTIVATIONS:
            raise ValueError(f"SPLADE activation_function must be one of {SPLADE_ACTIVATIONS}, got {act!r}")
        check_max_active_dims(max_active_dims)
        self.mlm, self.pooling, self.act, self.max_active_dims = mlm, pooling, act, max_active_dims

    @property
    def vocab_size(self) -> int:
        return self.mlm.decoder.out_features

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        t, v = hidden.shape[0], self.vocab_size
        seg = segment_ids(cu_seqlens, t)                                                  # [T]
        out = torch.zeros(cu_seqlens.numel() - 1, v, dtype=torch.float32, device=hidden.device)   # [B, V]
        hidden = hidden.to(self.mlm.dense.weight.dtype)
        step = max(1, LOGIT_BLOCK_ELEMENTS // v)
        for a in range(0, t, step):
            w = torch.log1p(torch.relu(self.mlm(hidden[a:a + step]).float()))           # [t, V] >= 0
            if self.act == "log1p_relu":
                w = torch.log1p(w)
            rows = seg[a:a + step]
            if self.pooling == "max":        # weights are >= 0, so the zeros out starts with are neutral
                out.scatter_reduce_(0, rows.unsqueeze(1).expand_as(w), w, "amax", include_self=True)
            else:
                out.index_add_(0, rows, w)
        return out

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}, activation={self.act}, max_active_dims={self.max_active_dims}"


class LexicalHead(nn.Module):
    """bge-m3's sparse_linear: one weight per token, relu(w . h + b); per sequence the max per token id."""

    def __init__(self, hidden: int, vocab_size: int, skip_ids: Sequence[int] = ()):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        self.vocab_size = vocab_size
        self.register_buffer("skip_ids", torch.as_tensor(sorted(set(skip_ids)), dtype=torch.long), persistent=False)

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(hidden.float())).squeeze(-1)                        # [T] fp32

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, input_ids: torch.Tensor) -> list[SparseRow]:
        w = self.token_weights(hidden)                                                     # [T]
        seg = segment_ids(cu_seqlens, w.shape[0])
        keep = (w > 0) & ~torch.isin(input_ids, self.skip_ids)
        key = seg[keep] * self.vocab_size + input_ids[keep]                               # (sequence, id) pairs
        uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
        best = torch.zeros(uniq.numel(), dtype=torch.float32, device=w.device).scatter_reduce_(
            0, inv, w[keep], "amax", include_self=True)                          # weights kept are > 0
        return split_pairs(uniq // self.vocab_size, uniq % self.vocab_size, best, cu_seqlens.numel() - 1)


def check_max_active_dims(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"max_active_dims must be a positive integer or None, got {k!r}")


def top_dims(vectors: torch.Tensor, k: int | None) -> torch.Tensor:
    """[B, V] -> the same with all but each row's k largest |values| set to zero."""
    if k is None or k >= vectors.shape[1]:
        return vectors
    _, idx = torch.topk(vectors.abs(), k, dim=1)
    return torch.zeros_like(vectors).scatter_(1, idx, vectors.gather(1, idx))


def split_pairs(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> list[SparseRow]:
    """Nonzeros sorted by (row, col) -> one (ids, weights) pair per row, as numpy on the host."""
    counts = torch.bincount(rows, minlength=n).tolist()
    cols, values = cols.cpu().numpy(), values.float().cpu().numpy()
    out, start = [], 0
    for c in counts:
        out.append((cols[start:start + c], values[start:start + c]))
        start += c
    return out


def dense_to_rows(vectors: torch.Tensor) -> list[SparseRow]:
    nz = vectors.nonzero()                                        # sorted by (row, col)
    return split_pairs(nz[:, 0], nz[:, 1], vectors[nz[:, 0], nz[:, 1]], vectors.shape[0])


# ---- the model's sparse output ---------------------------------------------------------------------
def sparse_kind(model: "Model") -> str | None:
    """"splade", "lexical" (bge-m3) or None: which sparse output the model has."""
    outs = getattr(model, "outputs", {})
    return "splade" if "splade" in outs else "lexical" if "lexical" in outs else None


def vocab_size(model: "Model") -> int:
    kind = sparse_kind(model)
    return model.outputs[kind].vocab_size if kind is not None else model.config.vocab_size


def require_sparse(model: "Model") -> str:
    kind = sparse_kind(model)
    if kind is None:
        raise ValueError(f"model {model.source} has no sparse output: load a sentence-transformers SparseEncoder "
                         "folder (MLMTransformer + SpladePooling) or a bge-m3 folder (sparse_linear.pt)")
    return kind


@torch.inference_mode()
def sparse_from_hidden(model: "Model", h: torch.Tensor, batch: "PackedBatch",
                       max_active_dims: int | None = None) -> list[SparseRow]:
    """Hidden states [T, H] of `batch` -> one sparse vector per sequence, in the batch's order."""
    kind = require_sparse(model)
    head = model.outputs[kind]
    cu = batch.cu_seqlens.to(h.device, non_blocking=True).long()
    if kind == "lexical":
        return head(h, cu, batch.input_ids.to(h.device, non_blocking=True))
    k = max_active_dims if max_active_dims is not None else head.max_active_dims
    return dense_to_rows(top_dims(head(h, cu), k))


@torch.inference_mode()
def sparse_batch(model: "Model", batch: "PackedBatch", max_active_dims: int | None = None) -> list[SparseRow]:
    """PackedBatch -> one (ids, weights) per sequence: SPLADE vectors, or bge-m3's lexical weights."""
    require_sparse(model)
    return sparse_from_hidden(model, model.hidden_states(batch), batch, max_active_dims)


def rows_to_coo(rows: Sequence[SparseRow], vocab: int) -> torch.Tensor:
    """Per-text (ids, weights) -> a coalesced torch.sparse COO tensor [N, V] (SparseEncoder.encode's form)."""
    n = len(rows)
    r = np.concatenate([np.full(len(ids), i, dtype=np.int64) for i, (ids, _) in enumerate(rows)] or
                       [np.zeros(0, np.int64)])
    c = np.concatenate([ids.astype(np.int64) for ids, _ in rows] or [np.zeros(0, np.int64)])
    v = np.concatenate([w.astype(np.float32) for _, w in rows] or [np.zeros(0, np.float32)])
    idx = torch.from_numpy(np.stack([r, c]))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(v), (n, vocab), is_coalesced=True,
                                   check_invariants=False)


def encode_sparse(model: "Model", texts: str | Sequence[str], batch_size: int | None = None,
                  convert_to_sparse_tensor: bool = True, max_active_dims: int | None = None, truncate: bool = True,
                  show_progress_bar: bool | None = None, prompt: str | None = None, prompt_name: str | None = None):
    """Texts -> sparse vectors in input order: a torch.sparse COO [N, V] (a single str: [V]), or with
    convert_to_sparse_tensor=False one list of (token id, weight) per text, by token id. The prompt (or
    prompt_name's, else the folder's default prompt) goes before every text, as SparseEncoder.encode."""
    from .multivector import collect_texts

    require_sparse(model)
    check_max_active_dims(max_active_dims)
    single = isinstance(texts, str)
    texts = model.with_instruction(texts, prompt=prompt, prompt_name=prompt_name)     # checked there
    rows = collect_texts(model, texts, lambda b: sparse_batch(model, b, max_active_dims), batch_size=batch_size,
                         truncate=truncate, show_progress_bar=show_progress_bar)
    if convert_to_sparse_tensor:
        out = rows_to_coo(rows, vocab_size(model))
        return out[0].coalesce() if single else out
    pairs = [list(zip(ids.tolist(), w.tolist())) for ids, w in rows]
    return pairs[0] if single else pairs


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token ids -> their strings (the vocabulary's pieces, as the tokenizer's convert_ids_to_tokens)."""
    rust = getattr(tokenizer, "tok", None)
    if rust is not None:
        return [rust.id_to_token(int(i)) for i in ids]
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:                   # fairseq ids: the four specials first, then sentencepiece id + 1
        names = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"}
        return [names.get(int(i)) or (sp.id_to_piece(int(i) - 1) if int(i) - 1 < sp.get_piece_size() else "<mask>")
                for i in ids]
    raise RuntimeError("the model has no tokenizer to turn token ids into tokens")


def decode(model: "Model", vectors, top_k: int | None = None):
    """Sparse vector(s) -> [(token, weight)] by descending weight (a batch [N, V] gives one list per row),
    as SparseEncoder.decode. Takes a torch tensor (sparse or dense), an (ids, weights) pair list, or a dict
    {token id: weight} (bge-m3's lexical weights)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    tok = model._require_tokenizer()
    if isinstance(vectors, dict):
        return _decode_one(tok, np.asarray(list(vectors), dtype=np.int64),
                           np.asarray(list(vectors.values()), dtype=np.float32), top_k)
    if isinstance(vectors, list):
        if vectors and isinstance(vectors[0], (list, dict)):
            return [decode(model, v, top_k) for v in vectors]
        ids = np.asarray([int(i) for i, _ in vectors], dtype=np.int64)
        return _decode_one(tok, ids, np.asarray([float(w) for _, w in vectors], dtype=np.float32), top_k)
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"decode takes a torch tensor, a list of (token id, weight) or a dict, "
                        f"got {type(vectors).__name__}")
    if vectors.dim() not in (1, 2):
        raise ValueError(f"decode takes a [V] or [N, V] tensor, got {vectors.dim()} dimensions")
    one = vectors.dim() == 1
    dense = (vectors.to_dense() if vectors.is_sparse else vectors).float().cpu()
    dense = dense.unsqueeze(0) if one else dense
    out = [_decode_one(tok, ids, w, top_k) for ids, w in dense_to_rows(dense)]
    return out[0] if one else out


def _decode_one(tok, ids: np.ndarray, w: np.ndarray, top_k: int | None) -> list[tuple[str, float]]:
    order = np.argsort(-w, kind="stable")[:top_k]
    return list(zip(token_strings(tok, ids[order].tolist()), w[order].tolist()))
