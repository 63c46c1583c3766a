"""Pooling and classification heads on packed hidden states [T, H]; they run in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLING_MODES = ("cls", "mean", "max", "last")
DENSE_ACTIVATIONS = ("identity", "tanh")


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B+1] cu_seqlens -> [T] index of the sequence each token belongs to."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens,
                                   output_size=num_tokens)


def cls_tokens(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """First token of each sequence: [T, H] -> [B, H]. Empty sequences give zeros (their start is the next
    sequence's first row, or past the end)."""
    starts = cu_seqlens[:-1].long()
    if not hidden.shape[0]:
        return hidden.new_zeros(starts.numel(), hidden.shape[1])
    out = hidden.index_select(0, starts.clamp(max=hidden.shape[0] - 1))
    return out.masked_fill((cu_seqlens[1:] == cu_seqlens[:-1])[:, None], 0.0)


def last_tokens(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Last token of each sequence (decoder-style embedders: the EOS the tokenizer appends): [T, H] -> [B, H].
    Packed rows need no left-padding trick: sequence b ends at row cu_seqlens[b+1] - 1. Empty sequences
    give zeros."""
    ends = cu_seqlens[1:].long() - 1
    out = hidden.index_select(0, ends.clamp(min=0))
    empty = cu_seqlens[1:] == cu_seqlens[:-1]
    return out.masked_fill(empty[:, None], 0.0) if hidden.shape[0] else out


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, H] packed -> [B, H] in fp32; mean and max over each sequence's real tokens."""
    hidden = hidden.float()
    if mode == "cls":
        return cls_tokens(hidden, cu_seqlens)
    if mode == "last":
        if hidden.shape[0] == 0:
            return hidden.new_zeros(cu_seqlens.numel() - 1, hidden.shape[1])
        return last_tokens(hidden, cu_seqlens)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if mode == "mean":
        seg = segment_ids(cu_seqlens, hidden.shape[0])
        sums = hidden.new_zeros(lens.numel(), hidden.shape[1]).index_add_(0, seg, hidden)
        return sums / lens.clamp(min=1).unsqueeze(1).to(hidden.dtype)
    if mode == "max":                   # an empty sequence gives zeros, as in the other modes (not -inf)
        return torch.segment_reduce(hidden, "max", lengths=lens, axis=0, unsafe=True).masked_fill(
            (lens == 0)[:, None], 0.0)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


class Dense(nn.Module):
    """sentence-transformers' Dense module on pooled fp32 vectors: act(x W^T + b), act identity or tanh
    (EmbeddingGemma: 768 -> 3072 -> 768, identity, no bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "identity"):
        super().__init__()
        if act not in DENSE_ACTIVATIONS:
            raise ValueError(f"Dense activation must be one of {DENSE_ACTIVATIONS}, got {act!r}")
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)                                                          # [B, out]
        return torch.tanh(y) if self.act == "tanh" else y

    def extra_repr(self) -> str:
        return f"act={self.act}"


class Pooler(nn.Module):
    """pool -> optional Dense layers -> optional L2 normalisation, in fp32 (sentence-transformers' order)."""

    def __init__(self, mode: str = "mean", normalize: bool = False, dense: list[Dense] | None = None):
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
        self.mode, self.normalize = mode, normalize
        self.dense = nn.ModuleList(dense or [])

    @property
    def out_features(self) -> int | None:
        """The embedding size after the Dense layers; None without any (the encoder's hidden size)."""
        return self.dense[-1].linear.out_features if len(self.dense) else None

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        out = pool(hidden, cu_seqlens, self.mode)                                   # [B, H]
        for d in self.dense:
            out = d(out.to(d.linear.weight.device))                                 # [B, out]
        if self.normalize if normalize is None else normalize:
            out = F.normalize(out, p=2.0, dim=1)
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode}, normalize={self.normalize}"


HEAD_ACTIVATIONS = ("tanh", "relu", "gelu")


class ClassificationHead(nn.Module):
    """pool (first token or mean) -> dense -> act [-> LayerNorm] -> out.

    The head families share this shape: BERT (pooler.dense + tanh, then classifier), RoBERTa/XLM-R in
    transformers (dense + tanh + out_proj), torchtext's RobertaClassificationHead (dense + ReLU +
    out_proj), DistilBERT (pre_classifier + ReLU), DeBERTa-v2 (ContextPooler: dense + GELU) and
    ModernBERT (CLS or mean pooling, dense + GELU + LayerNorm).
    """

    def __init__(self, hidden: int, num_labels: int, act: str = "tanh", pooling: str = "cls",
                 norm_eps: float | None = None, norm_bias: bool = True):
        super().__init__()
        if act not in HEAD_ACTIVATIONS:
            raise ValueError(f"head activation must be one of {HEAD_ACTIVATIONS}, got {act!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"head pooling must be 'cls' or 'mean', got {pooling!r}")
        self.act, self.pooling = act, pooling
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps, bias=norm_bias) if norm_eps is not None else None
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = self.dense(pool(hidden, cu_seqlens, self.pooling))                     # [B, H] fp32
        x = torch.tanh(x) if self.act == "tanh" else torch.relu(x) if self.act == "relu" else F.gelu(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.out(x)                                                          # [B, C]

    def extra_repr(self) -> str:
        return f"act={self.act}, pooling={self.pooling}"
