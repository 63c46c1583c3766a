"""The encoder on packed tokens: every tensor is [T, ...], T = all real tokens of the batch.

This file is the readable reference. Speed tricks are applied outside it, on its weights, so this
stays one screen per block: fast/cpu.py (fused oneDNN linears, int8 quantization), fast/cuda.py (Triton
kernels, varlen flash attention), fast/graphs.py (CUDA graphs per token bucket), the kernels in ops/.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import PackedBatch
from .config import EncoderConfig
from .ops.attention import AttentionMeta, varlen_attention


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.embedding_layer_norm else None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word(batch.input_ids) + self.position(batch.positions)            # [T, H]
        if self.token_type is not None:
            if batch.token_type_ids is not None:
                x = x + self.token_type(batch.token_type_ids)
            else:  # every token is segment 0: add that row once instead of gathering it T times
                x = x + self.token_type.weight[0]
        return self.norm(x) if self.norm is not None else x


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.act, self.norm_first = cfg.activation, cfg.norm_first
        self.qkv = nn.Linear(h, 3 * h)            # rows: [q; k; v]
        self.out = nn.Linear(h, h)
        self.norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn1 = nn.Linear(h, cfg.intermediate_size)
        self.ffn2 = nn.Linear(cfg.intermediate_size, h)
        self.norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def attention(self, x: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)   # 3 x [T, nh, hd]
        a = varlen_attention(q, k, v, meta)                                         # [T, nh, hd]
        return self.out(a.reshape(t, self.num_heads * self.head_dim))               # [T, H]

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn2(activation(self.act, self.ffn1(x)))                        # [T, H]

    def forward(self, x: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attention(self.norm1(x), meta)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attention(x, meta))
        return self.norm2(x + self.ffn(x))


class Encoder(nn.Module):
    """Embeddings + N post-norm (or pre-norm) layers over a PackedBatch -> hidden states [T, H]."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.final_layer_norm else None

    def forward(self, batch: PackedBatch, meta: AttentionMeta | None = None) -> torch.Tensor:
        if meta is None:
            meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen)
        x = self.embeddings(batch)                                                  # [T, H]
        for layer in self.layers:
            x = layer(x, meta)
        return self.final_norm(x) if self.final_norm is not None else x
