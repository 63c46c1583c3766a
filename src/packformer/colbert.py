"""ColBERT-style multi-vector models (sentence-transformers MultiVectorEncoder / PyLate folders).

A text becomes one normalized vector per token: the encoder's rows, a Dense projection (Identity), then L2
normalization. Queries and documents differ as MultiVectorEncoder makes them differ:
- query: the "query" prompt first, at most query_length tokens; with query_expansion the ids are topped up
  with [MASK] (or the configured token) to `length` tokens ("fixed" also cuts to it). attend=False: the
  [MASK] rows attend to the text and nothing attends to them (AttentionMeta.key_lens: each sequence's
  visible keys are its text); attend=True: an ordinary sequence. Every row, [MASK]s included, is output.
- document: the "document" prompt, at most document_length tokens, and rows whose id is in the skiplist
  (punctuation in PyLate) dropped after the forward.
Packed, nothing is padded: the [MASK] rows are the query's own content.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batch import pack
from .engine import Model
from .files import read_json
from .ops.attention import AttentionMeta
from .runtime import check_batch_size, plan_chunks
from .tokenize import check_texts

if TYPE_CHECKING:
    from .loaders.parts import ModelParts

TASKS = (None, "query", "document")
# the projection's rows are computed as product-sums in chunks of about this many elements: a GEMM's
# rounding may change with its number of rows, and a token's vector must not depend on its batch (CPU)
PROJECT_ELEMENTS = 1 << 22


class TokenProjection(nn.Module):
    """MultiVectorEncoder's Dense on token embeddings: x W^T (+ b), Identity activation. [T, H] -> [T, D]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        x = x.to(w.dtype)
        if x.device.type != "cpu":
            return F.linear(x, w, b)
        out = torch.empty(x.shape[0], w.shape[0], dtype=w.dtype)
        step = max(1, PROJECT_ELEMENTS // max(1, w.numel()))
        for r0 in range(0, x.shape[0], step):
            out[r0:r0 + step] = (x[r0:r0 + step, None, :] * w[None]).sum(-1)          # [rows, D]
        return out if b is None else out.add_(b)


@dataclass
class ColbertConfig:
    """The query / document rules of a multi-vector folder (loaders/multi_vector.py reads them)."""

    query_length: int | None = None
    document_length: int | None = None
    expansion: dict | None = None          # {"strategy": "fixed"|"min", "attend": bool, "token": str|None, "length": int}
    default_length: int = 512              # tokens of a text without its own length (max_seq_length)
    skiplist_words: list[str] = field(default_factory=list)
    skiplist_tasks: list[str] = field(default_factory=lambda: ["document"])
    keep_only_token_ids: list[int] | None = None
    normalize: bool = True
    prefixes: dict[str, str] = field(default_factory=dict)   # PyLate's query_prefix / document_prefix
    similarity_fn_name: str | None = None
    skip_ids: list[int] = field(default_factory=list)
    expansion_id: int | None = None

    def resolve(self, tokenizer, folder: Path) -> None:
        """Token ids of the skiplist and the expansion token; PyLate's prefix markers made single tokens."""
        rust = getattr(tokenizer, "tok", None)
        if rust is None:
            raise ValueError(f"{folder}: a multi-vector model needs a Hugging Face tokenizer (tokenizer.json or "
                             "vocab.txt)")
        tok_cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = Path(folder) / name
            if p.exists():
                tok_cfg = {**read_json(p), **tok_cfg}

        def special(name: str) -> str | None:
            v = tok_cfg.get(name)
            return v.get("content") if isinstance(v, dict) else v

        if self.prefixes:
            register_prefix_tokens(rust, self.prefixes)
        unk = special("unk_token")
        self.skip_ids = []
        for w in self.skiplist_words:       # words that are no single token are dropped, as sentence-transformers
            i = rust.token_to_id(w)
            if i is not None:
                self.skip_ids.append(i)
            elif w == unk:
                self.skip_ids.append(rust.token_to_id(unk))
        if self.expansion is not None:
            token = self.expansion["token"] or special("mask_token") or special("eos_token")
            self.expansion_id = rust.token_to_id(token) if token is not None else None
            if self.expansion_id is None:
                raise ValueError(f"{folder}: query_expansion['token'] {token!r} is not in the vocabulary (the "
                                 "expansion token is query_expansion['token'], else the mask token, else EOS)")

    def max_length(self, task: str | None) -> int:
        if task == "query":
            e = self.expansion
            if e is not None and e["strategy"] == "fixed":
                return e["length"]
            cap = self.query_length if self.query_length is not None else self.default_length
            return max(cap, e["length"]) if e is not None and self.query_length is not None else cap
        if task == "document" and self.document_length is not None:
            return self.document_length
        return self.default_length


def register_prefix_tokens(rust, prefixes: dict[str, str]) -> None:
    """A legacy prefix marker ([unused0], [Q] ) that the vocabulary knows but the tokenizer splits becomes a
    special token, as MultiVectorEncoder._register_prefix_tokens does."""
    from tokenizers import AddedToken

    vocab = rust.get_vocab(with_added_tokens=True)
    new = []
    for value in prefixes.values():
        if not value or not value.split():
            continue
        for prefix in (value, value.split(None, 1)[0]):
            if prefix not in vocab:
                continue
            if rust.encode(prefix, add_special_tokens=False).tokens != [prefix]:
                new.append(AddedToken(prefix, normalized=False, special=True))
            break
    if new:
        rust.add_special_tokens(new)


class MultiVectorModel(Model):
    """A ColBERT-style model: encode_query / encode_document / encode give one [Li, D] tensor (or array) per
    text, with MultiVectorEncoder's names, defaults and rules."""

    def __init__(self, parts: "ModelParts", **kwargs):
        self.colbert: ColbertConfig = parts.colbert
        super().__init__(parts, **kwargs)

    @property
    def projection(self) -> TokenProjection:
        return self.outputs["multi_vector"]

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def info(self) -> dict[str, Any]:
        d = super().info()
        c = self.colbert
        d.update(pooling=None, normalize=c.normalize, query_length=c.query_length, document_length=c.document_length,
                 query_expansion=c.expansion, skiplist_words=list(c.skiplist_words))
        return d

    # ---- the packed forward -------------------------------------------------------------------
    def token_ids(self, texts: Sequence[str], task: str | None = None, prompt: str | None = None,
                  truncate: bool = True, **_) -> tuple[list[list[int]], list[int]]:
        """(ids with the prompt and any [MASK] expansion, the number of text tokens of each)."""
        texts = check_texts(texts)
        if prompt:
            texts = [prompt + t for t in texts]
        ids = self._require_tokenizer().encode(texts, self.colbert.max_length(task), truncate)
        real = [len(s) for s in ids]
        e = self.colbert.expansion
        if task == "query" and e is not None:
            ids = [s + [self.colbert.expansion_id] * (e["length"] - len(s)) if len(s) < e["length"] else s
                   for s in ids]
        return ids, real

    @torch.inference_mode()
    def vectors_batch(self, ids: list[list[int]], real: list[int], task: str | None) -> list[torch.Tensor]:
        """Id lists -> one [Li, D] fp32 tensor per sequence (on the model's device), in the given order."""
        c = self.colbert
        batch = pack(ids, self.config.position_offset, order=range(len(ids)))
        hidden_only = task == "query" and c.expansion is not None and not c.expansion["attend"]
        if hidden_only and any(r < len(s) for r, s in zip(real, ids)):
            batch = batch.to(self.device)
            meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, [len(s) for s in ids], key_lens=real)
            h = self.runner(batch, meta)                   # [T, H]; a graph runner runs such batches eagerly
        else:
            h = self.hidden_states(batch)                                             # [T, H]
        keep = None
        input_ids = batch.input_ids.to(h.device)
        if (task or "document") in c.skiplist_tasks and c.skip_ids:
            keep = ~torch.isin(input_ids, torch.tensor(c.skip_ids, device=h.device))
        if task != "query" and c.keep_only_token_ids:
            only = torch.isin(input_ids, torch.tensor(c.keep_only_token_ids, device=h.device))
            keep = only if keep is None else keep & only
        owner = torch.repeat_interleave(torch.arange(len(ids), device=h.device),
                                        torch.tensor([len(s) for s in ids], device=h.device))
        if keep is not None:
            h, owner = h[keep], owner[keep]
        v = self.projection(h.float())                                                # [T', D]
        if c.normalize:
            v = F.normalize(v, p=2.0, dim=-1)
        counts = torch.bincount(owner, minlength=len(ids)).tolist()
        return list(torch.split(v, counts))

    # ---- user API (MultiVectorEncoder's) ------------------------------------------------------
    def encode(self, inputs: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, show_progress_bar: bool | None = None,
               output_value: str | None = "token_embeddings", convert_to_numpy: bool = False,
               device: str | torch.device | None = None, normalize_embeddings: bool = False,
               token_pooling: Any = None, truncate_dim: int | None = None, pool: Any = None,
               chunk_size: int | None = None, task: str | None = None, **kwargs):
        """Texts -> one [Li, D] tensor per text (numpy with convert_to_numpy=True), as
        MultiVectorEncoder.encode: task "query" / "document" picks the prompt-free rules (prefix lengths,
        expansion, skiplist); prompt / prompt_name as sentence-transformers resolves them."""
        from . import outputs

        if kwargs:
            if "convert_to_tensor" in kwargs:
                raise ValueError("encode() has no convert_to_tensor: multi-vector embeddings are one tensor per "
                                 "text already; pass convert_to_numpy=True for arrays")
            raise ValueError(f"encode() got keyword arguments it does not use: {sorted(kwargs)}")
        if task not in TASKS:
            raise ValueError(f"task must be 'query', 'document' or None, got {task!r}")
        if output_value != "token_embeddings":
            raise ValueError(f"output_value must be 'token_embeddings' (packformer does not return the raw "
                             f"feature dicts of output_value=None), got {output_value!r}")
        if token_pooling is not None:
            raise ValueError("token_pooling is not supported: packformer returns every token's vector")
        if pool is not None or chunk_size is not None:
            raise ValueError("pool / chunk_size (multi-process encoding) are not supported: one Model encodes")
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"device={device!r}: this model lives on {self.device}; load it there instead")
        check_batch_size(batch_size, optional=False)
        truncate_dim = outputs.check_truncate_dim(self.truncate_dim if truncate_dim is None else truncate_dim,
                                                  self.dim)
        single = isinstance(inputs, str)
        texts = check_texts(inputs)
        text_prompt = outputs.resolve_prompt(outputs.OutputConfig(self.prompts, self.default_prompt_name),
                                             prompt, prompt_name)
        out: list[torch.Tensor | None] = [None] * len(texts)
        ids, real = self.token_ids(texts, task, text_prompt)
        for plan in plan_chunks([len(s) for s in ids], self.max_batch_tokens, batch_size):
            vecs = self.vectors_batch([ids[i] for i in plan], [real[i] for i in plan], task)
            for i, v in zip(plan, vecs):
                if normalize_embeddings:
                    v = F.normalize(v, p=2.0, dim=-1)
                if truncate_dim is not None:
                    v = F.normalize(v[..., :truncate_dim], p=2.0, dim=-1)
                out[i] = v
        res = [v.cpu().numpy() if convert_to_numpy else v for v in out]
        return res[0] if single else res

    def encode_query(self, inputs: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
                     **kwargs):
        """encode(task="query"), with the "query" prompt unless one is given."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(inputs, prompt_name, prompt, task="query", **kwargs)

    def encode_document(self, inputs: str | Sequence[str], prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs):
        """encode(task="document"), with the first of the "document" / "passage" / "corpus" prompts."""
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in ("document", "passage", "corpus") if n in self.prompts), None)
        return self.encode(inputs, prompt_name, prompt, task="document", **kwargs)

    def similarity(self, queries, documents) -> torch.Tensor:
        """MaxSim scores [Nq, Nd]: for each query token its best document token's dot product, summed
        (divided by the query's tokens for similarity_fn_name "meanmaxsim")."""
        mean = self.colbert.similarity_fn_name == "meanmaxsim"
        qs = [torch.as_tensor(q, dtype=torch.float32) for q in queries]
        ds = [torch.as_tensor(d, dtype=torch.float32) for d in documents]
        out = torch.zeros(len(qs), len(ds))
        for i, q in enumerate(qs):
            for j, d in enumerate(ds):
                s = (q @ d.T).max(dim=1).values.sum() if len(d) else torch.tensor(0.0)
                out[i, j] = s / max(1, len(q)) if mean else s
        return out
