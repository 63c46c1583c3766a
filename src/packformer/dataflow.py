"""The encoder layer's dataflow, written once for every family and every backend.

A backend (model.ReferencePrimitives, fast.cpu.CpuPrimitives, fast.cuda.CudaPrimitives) supplies the
primitives; what differs between families (norm placement, rotary, relative bias, local windows, GLU
feed-forwards, biases) is data on the layers and in the per-forward `Context`, read by the primitives.

    post-norm:  x = N1(x + Wo attn(x));           x = N2(x + ffn(x))
    pre-norm:   x = x + Wo attn(N1 x);             x = x + ffn(N2 x)     (N1 of layer 0 may be identity)
    sandwich:   x = x + P1(Wo attn(N1 x));         x = x + P2(ffn(N2 x))  (pre-norm + post_norm1/2: Gemma 3)

In pre-norm stacks the sum and the next norm come out of one primitive call (`keep_sum`), so a backend
can fuse "add, then normalise for the next sublayer" into one pass; the last layer's second norm is the
final norm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .batch import PackedBatch
from .ops.attention import AttentionMeta, PositionBias


@dataclass
class Context:
    """What every layer's attention needs from this batch, computed once per forward."""

    meta: AttentionMeta
    rotary: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # RotaryConfig -> (cos, sin) [T, r/2]
    bias_table: torch.Tensor | None = None        # [H, 2R+1] fp32 relative-position bias, shared by all layers
    tiles: torch.Tensor | None = None             # CUDA: flash_varlen's query-block table for this batch
    rel_embeddings: torch.Tensor | None = None    # [2k, H] DeBERTa's relative embeddings after their norm (reference)

    def bias_for(self, layer) -> PositionBias | None:
        window, causal = getattr(layer, "window", 0), getattr(layer, "causal", False)
        if self.bias_table is None and not window and not causal:
            return None
        return PositionBias(table=self.bias_table, window=window, causal=causal)


def build_context(cfg, batch: PackedBatch, meta: AttentionMeta, bias_table: torch.Tensor | None) -> Context:
    """Rotary tables for every base the layers use, from the batch's in-sequence positions."""
    ctx = Context(meta=meta, bias_table=bias_table)
    if cfg is not None:
        from .ops.rotary import rotary_tables

        pos = batch.positions - cfg.position_offset if cfg.position_offset else batch.positions
        for rot in cfg.rotary_configs():
            ctx.rotary[rot] = rotary_tables(pos, rot, cfg.head_dim)
    return ctx


class Primitives:
    """The operations the dataflow is written in. `norm` arguments are a backend's own handle for a
    LayerNorm (None: identity); `lin` one for a Linear. The sublayers are built from the finer
    primitives; a backend may override a whole sublayer (the CPU path runs the FFN in row blocks)."""

    def context(self, batch: PackedBatch, meta: AttentionMeta) -> Context: ...
    def embed(self, batch: PackedBatch) -> torch.Tensor: ...                       # [T, H]
    def norm(self, x: torch.Tensor, norm) -> torch.Tensor: ...                     # [T, H]
    def attention(self, layer, h: torch.Tensor, ctx: Context) -> torch.Tensor: ...  # qkv, rotary, attend: [T, H]
    def ffn_hidden(self, layer, h: torch.Tensor) -> torch.Tensor: ...               # act(h W1 + b1) or GLU: [T, F]

    def project_add_norm(self, a: torch.Tensor, lin, residual: torch.Tensor, norm, keep_sum: bool = False,
                         out: torch.Tensor | None = None, post=None):
        """s = residual + a W^T + b (with `post`, a norm handle: residual + post(a W^T + b)); returns
        norm(s), or (s, norm(s)) with keep_sum. May overwrite `residual` (always the dataflow's own
        activation); `out` receives norm(s) when given."""
        raise NotImplementedError

    def attention_sublayer(self, layer, h, x, norm, ctx: Context, keep_sum=False, out=None):
        post = getattr(layer, "post_norm1", None)
        kw = {} if post is None else {"post": post}
        return self.project_add_norm(self.attention(layer, h, ctx), layer.out, x, norm, keep_sum, out, **kw)

    def ffn_sublayer(self, layer, h, x, norm, keep_sum=False, out=None):
        post = getattr(layer, "post_norm2", None)
        kw = {} if post is None else {"post": post}
        return self.project_add_norm(self.ffn_hidden(layer, h), layer.ffn2, x, norm, keep_sum, out, **kw)


def run_layers(P: Primitives, layers, x: torch.Tensor, ctx: Context, final_norm=None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] through `layers` (each post- or pre-norm on its own) and the optional final norm.
    `out`: where the last step writes its result (a CUDA graph's static output)."""
    h = None                         # pre-norm: the next sublayer's normed input, when already computed
    n = len(layers)
    for i, layer in enumerate(layers):
        last = i == n - 1
        if not layer.norm_first:
            x = P.attention_sublayer(layer, x, x, layer.norm1, ctx)
            x = P.ffn_sublayer(layer, x, x, layer.norm2, out=out if last and final_norm is None else None)
            continue
        if h is None:
            h = P.norm(x, layer.norm1)
        x, h = P.attention_sublayer(layer, h, x, layer.norm2, ctx, keep_sum=True)
        nxt = layers[i + 1] if not last else None
        then = (nxt.norm1 if nxt is not None and nxt.norm_first else None) if not last else final_norm
        x, h = P.ffn_sublayer(layer, h, x, then, keep_sum=True, out=out if last else None)
        if last:
            return h                 # the final norm's output, or the plain sum without one
        if then is None:
            h = None if not nxt.norm_first else h
    if final_norm is not None:
        y = P.norm(x, final_norm)
        return y if out is None else out.copy_(y)
    return x if out is None or n else out.copy_(x)


def run_encoder(P: Primitives, encoder, batch: PackedBatch, meta: AttentionMeta,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Embeddings, then `run_layers` over the encoder's layers and final norm."""
    ctx = P.context(batch, meta)
    x = P.embed(batch)                                                                  # [T, H]
    return run_layers(P, encoder.layers, x, ctx, getattr(encoder, "final_norm", None), out)
