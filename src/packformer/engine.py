"""`Model`: a loaded encoder with its tokenizer, pooling and head, on a device and dtype.

Text goes: tokenizer -> id lists -> length-sorted chunks under `max_batch_tokens` -> PackedBatch ->
encoder [T, H] -> pooling / head in fp32 -> results scattered back to input order.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .batch import PackedBatch, pack, pack_padded_ids, pad_input
from .fast import describe_runner, select_runner
from .loaders.parts import ModelParts
from .ops.attention import AttentionMeta
from .runtime import DEFAULT_MAX_BATCH_TOKENS, resolve_device, resolve_dtype
from .tokenize import check_texts


class Model(nn.Module):
    def __init__(self, parts: ModelParts, device: str | torch.device | None = "cpu",
                 dtype: str | torch.dtype | None = None, max_batch_tokens: int | None = None,
                 fast: bool | None = None, quantize: str | None = None, threads: int | None = None):
        super().__init__()
        self.device_ = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device_)
        self.config = parts.config
        self.encoder = parts.encoder.to(self.device_, self.dtype).eval()
        # pooling and heads stay fp32: they are tiny and fp32 keeps classification argmax stable
        self.head = parts.head.to(self.device_, torch.float32).eval() if parts.head is not None else None
        self.pooler = parts.pooler
        self.tokenizer = parts.tokenizer
        self.max_seq_length = parts.max_seq_length
        self.source, self.format = parts.source, parts.format
        # the default budget grows to one sequence of the model's maximum length (8,192-token ModernBERT on CPU)
        self.max_batch_tokens = max_batch_tokens or max(DEFAULT_MAX_BATCH_TOKENS[self.device_.type],
                                                        self.max_seq_length)
        # The function that runs the encoder on a packed batch already on the device. Fast paths
        # (packformer.fast.cuda / packformer.fast.cpu) replace it; the reference `self.encoder` stays.
        self.fast = fast is not False
        # CPU fast-path options (packformer.fast.cpu reads them): int8 Linear layers, intra-op threads
        self.quantize, self.threads = quantize, threads
        if quantize is not None and (fast is False or self.device_.type != "cpu"):
            raise ValueError(f"quantize={quantize!r} is an option of the CPU fast path; it needs device='cpu' "
                             "and fast left on")
        self.runner = select_runner(self, fast)
        if self.max_batch_tokens < self.max_seq_length:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must hold at least one sequence of the "
                             f"model's maximum length ({self.max_seq_length})")

    # ---- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else self.config.pad_token_id

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "source": self.source, "format": self.format, "model_type": c.model_type, "family": c.family,
            "architecture": c.architecture(),
            "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads, "ffn": c.intermediate_size,
            "vocab": c.vocab_size, "parameters": sum(p.numel() for p in self.parameters()),
            "dim": self.dim, "max_seq_length": self.max_seq_length, "pooling": self.pooler.mode,
            "normalize": self.pooler.normalize, "num_labels": c.num_labels, "labels": c.labels(),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "max_batch_tokens": self.max_batch_tokens, "runner": describe_runner(self.runner, self.encoder),
        }

    # ---- tokenization -----------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            hint = ("pass spm='sentencepiece.bpe.model' to load() (--spm on the command line)"
                    if self.format == "torchtext" else
                    "load a folder with tokenizer.json / vocab.txt / sentencepiece.bpe.model")
            raise RuntimeError(f"model {self.source} has no tokenizer: pass token ids, or {hint}")
        return self.tokenizer

    def token_ids(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids (special tokens included, truncated to max_seq_length unless truncate=False)."""
        return self._require_tokenizer().encode(check_texts(texts), self.max_seq_length, truncate)

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> PackedBatch:
        ids = self.token_ids(texts, truncate)
        return pack(ids, self.config.position_offset, order=range(len(ids)))

    def pack_ids(self, ids: Sequence[Sequence[int]]) -> PackedBatch:
        """Packed batch from pre-tokenized id lists; ids are checked against the vocabulary."""
        for i, seq in enumerate(ids):
            if len(seq) > self.max_seq_length:
                raise ValueError(f"input {i} has {len(seq)} tokens, more than the model's maximum of "
                                 f"{self.max_seq_length}")
            bad = [t for t in seq if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise ValueError(f"input {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return pack(ids, self.config.position_offset, order=range(len(ids)))

    # ---- the packed core --------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """PackedBatch (any device) -> hidden states [T, H] on the model's device and dtype."""
        seqlens = np.diff(batch.cu_seqlens.numpy()).tolist() if batch.device.type == "cpu" else None
        if seqlens is not None and self.device.type != "cpu" and hasattr(self.runner, "run_host"):
            return self.runner.run_host(batch, seqlens)     # CUDA graphs: host rows go straight to the graph
        if batch.device != self.device:
            batch = batch.to(self.device, non_blocking=True)
        meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, seqlens)
        return self.runner(batch, meta)

    @torch.inference_mode()
    def embed_batch(self, batch: PackedBatch, normalize: bool | None = None) -> torch.Tensor:
        """PackedBatch -> pooled embeddings [B, D], fp32, in the batch's own order."""
        h = self.hidden_states(batch)
        return self.pooler(h, batch.cu_seqlens.to(h.device, non_blocking=True), normalize=normalize)

    @torch.inference_mode()
    def classify_batch(self, batch: PackedBatch) -> torch.Tensor:
        """PackedBatch -> logits [B, C], fp32."""
        if self.head is None:
            raise RuntimeError(f"model {self.source} has no classification head; use encode()")
        h = self.hidden_states(batch)
        return self.head(h, batch.cu_seqlens.to(h.device, non_blocking=True))

    # ---- user API ---------------------------------------------------------------------------
    def encode(self, texts: str | Sequence[str], batch_size: int | None = None,
               normalize_embeddings: bool | None = None, convert_to_numpy: bool = True,
               show_progress_bar: bool | None = None, truncate: bool = True,
               convert_to_tensor: bool = False) -> np.ndarray | torch.Tensor:
        """Texts -> embeddings [N, D] in input order (a single str gives [D]).

        normalize_embeddings=None follows the model folder (a Normalize module); batch_size caps the
        sequences per batch on top of the token budget.
        """
        single = isinstance(texts, str)
        from .pipeline import run_texts   # tokenization of the next chunk overlaps the model's work
        out = run_texts(self, check_texts(texts), lambda b: self.embed_batch(b, normalize_embeddings), self.dim,
                        batch_size=batch_size, truncate=truncate, show_progress_bar=show_progress_bar)
        if single:
            out = out[0]
        return out if (convert_to_tensor or not convert_to_numpy) else out.numpy()

    def classify(self, texts: str | Sequence[str], batch_size: int | None = None, truncate: bool = True,
                 show_progress_bar: bool | None = None) -> np.ndarray:
        """Texts -> logits [N, num_labels] (numpy, fp32) in input order."""
        if self.head is None:
            raise RuntimeError(f"model {self.source} has no classification head; use encode()")
        from .pipeline import run_texts
        return run_texts(self, check_texts(texts), self.classify_batch, self.num_labels, batch_size=batch_size,
                         truncate=truncate, show_progress_bar=show_progress_bar).numpy()

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The tutorial's drop-in: right-padded ids [B, L] (pad id = the tokenizer's) -> logits [B, C]
        with a head, else hidden states [B, L, H] (zeros at padded positions). Unpadded once, padded once."""
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        b, l = token_ids.shape if token_ids.dim() == 2 else (None, None)
        if l is not None and l > self.config.max_tokens_per_sequence:
            raise ValueError(f"token_ids has {l} positions, more than the model's maximum of "
                             f"{self.config.max_tokens_per_sequence}")
        batch, indices = pack_padded_ids(token_ids.cpu(), self.pad_id, self.config.position_offset,
                                         None if token_type_ids is None else token_type_ids.cpu())
        if self.head is not None:
            return self.classify_batch(batch).to(token_ids.device)
        h = self.hidden_states(batch)
        return pad_input(h, indices.to(h.device), b, l).to(token_ids.device)
