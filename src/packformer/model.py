"""The encoder on packed tokens: every tensor is [T, ...], T = all real tokens of the batch.

This file holds the parameters (one `EncoderLayer` shape for every family: what differs is data in
`EncoderConfig`) and the readable reference primitives. The layer's dataflow is written once, in
dataflow.py, and run here over torch ops; the fast paths run the same dataflow over their own
primitives: fast/cpu.py (fused oneDNN linears, int8), fast/cuda.py (Triton kernels, varlen flash
attention, CUDA graphs per token bucket in fast/graphs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import PackedBatch
from .config import EncoderConfig
from .dataflow import Context, Primitives, build_context, run_encoder
from .lora import LoraWeights
from .ops.attention import AttentionMeta, PositionBias, check_no_key_lens, split_qkv, varlen_attention
from .ops.disentangled import disentangled_attention_ref, position_projections
from .ops.rotary import apply_rotary_ref


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    return F.relu(x)


def _zero_bias_if(flag: bool, *modules: nn.Module) -> None:
    """Families without biases keep zero ones: every backend's fused epilogue then serves them as is."""
    if flag:
        for m in modules:
            if m is not None and getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), in fp32, rounded once to x's dtype. No bias. Gemma's (1 + w) form is
    folded into `weight` at load (keymap transform "plus_one"), so one norm serves both families."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(cfg: EncoderConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default: hidden_size)."""
    dim = cfg.hidden_size if dim is None else dim
    if cfg.norm_kind == "rms":
        return RMSNorm(dim, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = (nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                         if cfg.position_embedding == "absolute" else None)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size > 0 else None
        self.norm = make_norm(cfg) if cfg.embedding_layer_norm else None
        self.scale = cfg.embedding_scale          # Gemma: sqrt(hidden), applied in the embeddings' dtype
        _zero_bias_if(not cfg.norm_bias, self.norm)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word(batch.input_ids)                                              # [T, H]
        if self.scale != 1.0:
            x = x * torch.tensor(self.scale).to(x.dtype)      # fp32 scalar rounded to the dtype, as Gemma
        if self.position is not None:
            x = x + self.position(batch.positions)
        if self.token_type is not None:
            if batch.token_type_ids is not None:
                x = x + self.token_type(batch.token_type_ids)
            else:  # every token is segment 0: add that row once instead of gathering it T times
                x = x + self.token_type.weight[0]
        return self.norm(x) if self.norm is not None else x


class EncoderLayer(nn.Module):
    """The parameters of one layer, and what the dataflow needs to know about it (all from the config).

    `ffn1` has 2 x intermediate rows for GLU feed-forwards: [gate; up], out = act(gate) * up.
    `norm1` is None where a family has no norm before its first attention (ModernBERT, pre-norm).
    `qkv` rows are [q (heads x d); k (kv heads x d); v (kv heads x d)] (grouped-query attention when
    kv heads < heads). Optional: `q_norm` / `k_norm` over each head (Qwen3, Gemma 3), `post_norm1` /
    `post_norm2` on each sublayer's output before its residual add (Gemma 3's sandwich norms)."""

    def __init__(self, cfg: EncoderConfig, index: int = 0):
        super().__init__()
        h = cfg.hidden_size
        self.index = index
        self.num_heads, self.head_dim, self.kv_heads = cfg.num_heads, cfg.head_dim, cfg.kv_heads
        self.scale, self.causal = cfg.scale, cfg.causal
        self.act, self.norm_first, self.glu = cfg.activation, cfg.norm_first, cfg.ffn_kind == "glu"
        self.window = cfg.window_of_layer(index)
        self.rotary = cfg.rotary_of_layer(index)
        self.disentangled = cfg.disentangled     # DeBERTa: c2p / p2c terms in the scores (ops/disentangled.py)
        self.qkv = nn.Linear(h, cfg.qkv_size)     # rows: [q; k; v]
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, h)
        self.norm1 = (make_norm(cfg)
                      if cfg.first_attention_norm or index > 0 or not cfg.norm_first else None)
        self.ffn1 = nn.Linear(h, cfg.intermediate_size * (2 if self.glu else 1))
        self.ffn2 = nn.Linear(cfg.intermediate_size, h)
        self.norm2 = make_norm(cfg)
        qk = cfg.qk_norm
        self.q_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if qk else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if qk else None
        self.post_norm1 = make_norm(cfg) if cfg.sandwich_norm else None
        self.post_norm2 = make_norm(cfg) if cfg.sandwich_norm else None
        _zero_bias_if(not cfg.linear_bias, self.qkv, self.out, self.ffn1, self.ffn2)
        _zero_bias_if(not cfg.norm_bias, self.norm1, self.norm2)


class Encoder(nn.Module):
    """Embeddings + N layers over a PackedBatch -> hidden states [T, H].

    `relative_bias`: MPNet's per-head bias of T5-style relative-position buckets, shared by all layers.
    `rel_embeddings` (+ `rel_norm`): DeBERTa's relative-position embeddings, shared by all layers."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg) if cfg.final_layer_norm else None
        _zero_bias_if(not cfg.norm_bias, self.final_norm)
        rb = cfg.relative_bias
        self.relative_bias = nn.Embedding(rb.num_buckets, cfg.num_heads) if rb is not None else None
        dis = cfg.disentangled
        self.rel_embeddings = nn.Embedding(2 * dis.span, cfg.hidden_size) if dis is not None else None
        self.rel_norm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
                         if dis is not None and dis.norm_rel_ebd == "layer_norm" else None)
        # Jina v3: per-task LoRA factors; the forward runs the base weights, a task runs a merged copy (lora.py)
        self.lora = LoraWeights(cfg.adapters, self) if cfg.adapters is not None else None

    def rel_table(self) -> torch.Tensor | None:
        """[2k, H]: DeBERTa's relative embeddings after their LayerNorm, or None for other families."""
        if self.rel_embeddings is None:
            return None
        w = self.rel_embeddings.weight
        return self.rel_norm(w) if self.rel_norm is not None else w

    def bias_table(self) -> torch.Tensor | None:
        """[H, 2R+1] fp32: the attention bias for every relative distance j - i in [-R, R] (R = the
        distance from which every bucket is the last one), or None for families without one."""
        if self.relative_bias is None:
            return None
        rb = self.config.relative_bias
        idx = rb.buckets(torch.arange(-rb.max_distance, rb.max_distance + 1, device=self.relative_bias.weight.device))
        return self.relative_bias.weight[idx].t().float().contiguous()                # [H, 2R+1]

    def forward(self, batch: PackedBatch, meta: AttentionMeta | None = None) -> torch.Tensor:
        if meta is None:
            meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen)
        return run_encoder(ReferencePrimitives(self), self, batch, meta)


class ReferencePrimitives(Primitives):
    """torch ops on the modules themselves (so forward hooks on the Linear layers see every call)."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder

    def context(self, batch: PackedBatch, meta: AttentionMeta) -> Context:
        table = self.encoder.bias_table() if hasattr(self.encoder, "bias_table") else None
        ctx = build_context(self.encoder.config if hasattr(self.encoder, "config") else None, batch, meta, table)
        ctx.rel_embeddings = self.encoder.rel_table() if hasattr(self.encoder, "rel_table") else None
        return ctx

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.encoder.embeddings(batch)

    def norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        return x if norm is None else norm(x)

    def attention(self, layer, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = split_qkv(layer.qkv(h), layer.num_heads, layer.kv_heads, layer.head_dim)  # [T, nh|nkv, hd]
        if getattr(layer, "q_norm", None) is not None:                    # per-head RMSNorm before rotary
            q, k = layer.q_norm(q), layer.k_norm(k)
        if layer.rotary is not None:
            cos, sin = ctx.rotary[layer.rotary]
            q, k = apply_rotary_ref(q, k, cos, sin, layer.rotary)
        if getattr(layer, "disentangled", None) is not None:     # DeBERTa: + c2p / p2c relative terms
            check_no_key_lens(ctx.meta)
            pq, pk = position_projections(ctx.rel_embeddings, layer.qkv.weight, layer.qkv.bias, layer.num_heads,
                                          torch.float32)
            a = disentangled_attention_ref(q, k, v, ctx.meta.cu_seqlens, pq, pk, layer.disentangled)
            return a.reshape(t, layer.num_heads * layer.head_dim)                          # [T, H]
        a = varlen_attention(q, k, v, ctx.meta, scale=getattr(layer, "scale", None),
                             bias=ctx.bias_for(layer))                                     # [T, nh, hd]
        return a.reshape(t, layer.num_heads * layer.head_dim)                              # [T, H]

    def ffn_hidden(self, layer, h: torch.Tensor) -> torch.Tensor:
        y = layer.ffn1(h)                                                                  # [T, F] or [T, 2F]
        if layer.glu:
            gate, up = y.chunk(2, dim=-1)
            return activation(layer.act, gate) * up                                        # [T, F]
        return activation(layer.act, y)

    def project_add_norm(self, a, lin, residual, norm, keep_sum=False, out=None, post=None):
        y = lin(a)                                                                         # [T, H]
        s = residual + (y if post is None else post(y))
        y = s if norm is None else norm(s)
        if out is not None:
            y = out.copy_(y)
        return (s, y) if keep_sum else y


__all__ = ["Encoder", "EncoderLayer", "Embeddings", "RMSNorm", "ReferencePrimitives", "PositionBias", "activation",
           "make_norm"]
