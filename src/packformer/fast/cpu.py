"""CPU fast path: the encoder of model.py, rebuilt for a few CPU cores.

What it changes, each measured in benchmarks/NOTES-cpu.md:
- GEMMs with their elementwise work fused (cpu_linear: oneDNN post-ops on packed weights), so bias,
  GELU and the residual adds cost no extra pass over memory; LayerNorm stays one native pass.
- Attention reads Q, K, V as strided views of the fused QKV output, one SDPA call per group of
  equal-length sequences (ops.attention), never padding. Batches whose equal lengths are not already
  adjacent are reordered once at entry (token ids) and put back once at exit (hidden states).
- Threads: torch's intra-op pool capped at the physical cores unless set (cpu_threads).
- dtype="bfloat16": weights and activations in bf16 (LayerNorm and softmax accumulate in fp32).
- quantize="int8": the Linear layers in int8 (quant.py); everything else stays fp32.

A sequence's result is bit for bit the same alone and in any batch, in every mode and on every ISA:
each step computes a row (GEMMs, LayerNorm, elementwise work) or a sequence (attention) on its own, in
an order that does not depend on the row count (cpu_linear.OneDnnLinear, quant.DynamicInt8Linear).

The runner is a plain callable `(PackedBatch, AttentionMeta) -> [T, H]`; the reference encoder that it
was built from stays untouched (and is what `fast=False` runs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import PackedBatch, cu_seqlens_from_lengths
from ..config import EncoderConfig
from ..dataflow import Context, Primitives, build_context, run_encoder
from ..model import Encoder
from ..ops.attention import AttentionMeta, _cpu_grouped_sdpa, check_no_key_lens, group_by_length, split_qkv
from ..ops.disentangled import disentangled_attention, position_projections
from ..ops.rotary import apply_rotary_
from .cpu_features import detect
from .cpu_linear import CpuLinear, act_, make_linear
from .cpu_threads import ENV_THREADS, apply_threads, resolve_threads
from .quant import DynamicInt8Linear, calibrate_outliers, check_quantize


@dataclass
class CpuPathOptions:
    dtype: torch.dtype = torch.float32
    quantize: str | None = None       # None or "int8"
    threads: int | None = None        # None: $PACKFORMER_THREADS, else min(torch's setting, physical cores)


BLOCK_ROWS = 1024   # rows per FFN / QKV block of the fp32 and bf16 paths (measured: 1,024-2,048 alike)
BLOCK_ABOVE = 4096  # ... for batches over this many tokens: smaller ones stay under glibc's mmap threshold,
                    # and the block copies cost more than they save (encode() of 1,500 texts: 11.0k vs 10.7k tok/s)


class _Layer:
    """One encoder layer's weights, prepared for the CPU primitives (same attribute names as
    model.EncoderLayer, which the dataflow reads)."""

    def __init__(self, layer, cfg: EncoderConfig, lin, dtype: torch.dtype):
        self.index, self.num_heads, self.head_dim = layer.index, layer.num_heads, layer.head_dim
        self.kv_heads = getattr(layer, "kv_heads", layer.num_heads)
        self.scale = getattr(layer, "scale", None) or 1.0 / math.sqrt(layer.head_dim)
        self.causal = getattr(layer, "causal", False)
        self.act, self.norm_first, self.glu = layer.act, layer.norm_first, layer.glu
        self.window, self.rotary, self.hidden = layer.window, layer.rotary, cfg.hidden_size
        self.disentangled = getattr(layer, "disentangled", None)
        # DeBERTa: the layer's q / k projections of the relative embeddings [nh, 2k, d] (weights only: once)
        self.pos_qk = None
        self.qkv: CpuLinear = lin(layer.qkv)
        # int8: the attention output has no outlier channels (measured: keeping 8 in fp32 gains nothing)
        self.out: CpuLinear = lin(layer.out, outlier_channels=False)
        self.ffn1: CpuLinear = lin(layer.ffn1)
        self.ffn2: CpuLinear = lin(layer.ffn2)
        self.norm1 = _norm_params(layer.norm1, dtype)
        self.norm2 = _norm_params(layer.norm2, dtype)
        self.q_norm = _norm_params(getattr(layer, "q_norm", None), dtype)          # per-head RMSNorm (Qwen3)
        self.k_norm = _norm_params(getattr(layer, "k_norm", None), dtype)
        self.post_norm1 = _norm_params(getattr(layer, "post_norm1", None), dtype)  # sandwich norms (Gemma 3)
        self.post_norm2 = _norm_params(getattr(layer, "post_norm2", None), dtype)
        # The FFN runs block by block of rows, and the QKV projection fills one [T, 3H] buffer per forward
        # block by block: each block's output is small enough for glibc to recycle from its heap, while a
        # whole-batch [T, 4H] or [T, 3H] output is above its largest mmap threshold (32 MB) and comes back
        # as fresh pages that the kernel zeroes on first touch, every layer. MiniLM offline_b128, fp32, 2
        # threads: 1,031 -> 866 ms (benchmarks/NOTES-cpu.md). int8 linears write into a given output; the
        # others return their block, copied into place.
        self.writes_out = hasattr(self.ffn1, "block_rows")
        self.block_rows = getattr(self.ffn1, "block_rows", BLOCK_ROWS)
        self.block_above = self.block_rows if self.writes_out else BLOCK_ABOVE


def _norm_params(norm, dtype) -> tuple | None:
    """(weight, bias, eps) of a LayerNorm; (weight, None, eps) of an RMSNorm (model.RMSNorm has no bias)."""
    if norm is None:
        return None
    bias = getattr(norm, "bias", None)
    return norm.weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype), norm.eps


def _layer_norm(x: torch.Tensor, p: tuple | None) -> torch.Tensor:
    """LayerNorm, or RMSNorm (no bias), over the last dim. RMSNorm computes in fp32 and rounds once, as
    model.RMSNorm; every row on its own (the same bits alone and batched)."""
    if p is None:
        return x
    w, b, eps = p
    if b is None:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


class CpuPrimitives(Primitives):
    """The dataflow's primitives on oneDNN linears; one per forward (it holds that forward's buffers)."""

    def __init__(self, runner: "CpuRunner", qkv_out: torch.Tensor | None):
        self.runner, self.qkv_out = runner, qkv_out

    def context(self, batch: PackedBatch, meta: AttentionMeta) -> Context:
        return build_context(self.runner.config, batch, meta, self.runner.bias_table)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.runner._embed(batch)

    def norm(self, x, norm):
        return _layer_norm(x, norm)

    def attention(self, layer: _Layer, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        t, qkv_out = h.shape[0], self.qkv_out
        if qkv_out is None:
            qkv = layer.qkv(h)                                                        # [T, 3H]
        elif layer.writes_out:
            qkv = layer.qkv(h, out=qkv_out)
        else:
            qkv = qkv_out
            for r0 in range(0, t, layer.block_rows):
                qkv[r0:r0 + layer.block_rows] = layer.qkv(h[r0:r0 + layer.block_rows])
        q, k, v = split_qkv(qkv, layer.num_heads, layer.kv_heads, layer.head_dim)   # [T, nh|nkv, hd] views
        if layer.q_norm is not None:                           # per-head RMSNorm before rotary (new tensors)
            q, k = _layer_norm(q, layer.q_norm), _layer_norm(k, layer.k_norm)
        if layer.rotary is not None:
            cos, sin = ctx.rotary[layer.rotary]
            apply_rotary_(q, k, cos, sin, layer.rotary)
        if layer.disentangled is not None:
            check_no_key_lens(ctx.meta)
            return disentangled_attention(q, k, v, ctx.meta, *layer.pos_qk, layer.disentangled).reshape(t, -1)
        return _cpu_grouped_sdpa(q, k, v, ctx.meta, layer.scale, ctx.bias_for(layer)).reshape(t, -1)  # [T, H]

    def ffn_hidden(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        if not layer.glu:
            return layer.ffn1(h, act=layer.act)                                       # [rows, F]
        y = layer.ffn1(h)                                                             # [rows, 2F]
        gate, up = y.chunk(2, dim=-1)
        # act_ runs on a contiguous buffer, where it gives every element the same bits wherever it sits
        gate = gate.clone(memory_format=torch.contiguous_format)                      # [rows, F]
        return act_(gate, layer.act).mul_(up)                                         # [rows, F]

    def project_add_norm(self, a, lin, residual, norm, keep_sum=False, out=None, post=None):
        s = lin(a, residual=residual) if post is None else residual.add_(_layer_norm(lin(a), post))
        y = _layer_norm(s, norm)
        return (s, y) if keep_sum else y

    def ffn_sublayer(self, layer: _Layer, h, x, norm, keep_sum=False, out=None):
        if layer.post_norm2 is not None:      # sandwich norm: residual + post(ffn(h)), row by row
            s = x.add_(_layer_norm(layer.ffn2(self.ffn_hidden(layer, h)), layer.post_norm2))
            y = _layer_norm(s, norm)
            return (s, y) if keep_sum else y
        if h.shape[0] <= layer.block_above:
            s = layer.ffn2(self.ffn_hidden(layer, h), residual=x)
        else:
            s = torch.empty_like(x)                                                   # [T, H]
            for r0 in range(0, h.shape[0], layer.block_rows):
                r1 = r0 + layer.block_rows
                f = self.ffn_hidden(layer, h[r0:r1])                                  # [rows, F]
                if layer.writes_out:
                    layer.ffn2(f, residual=x[r0:r1], out=s[r0:r1])
                else:
                    s[r0:r1] = layer.ffn2(f, residual=x[r0:r1])
        y = _layer_norm(s, norm)
        return (s, y) if keep_sum else y


def _length_sorted(batch: PackedBatch, meta: AttentionMeta
                   ) -> tuple[PackedBatch, AttentionMeta, torch.Tensor | None]:
    """The batch with sequences reordered longest first when its equal lengths are not adjacent, plus
    the token permutation [T] (None when the batch is used as is)."""
    groups = meta.groups if meta.groups is not None else group_by_length(meta.seqlens)
    if all(starts[-1] - starts[0] == (len(starts) - 1) * n for n, starts in groups):
        return batch, meta, None
    lens = np.asarray(meta.seqlens, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")                                  # [B]
    starts = np.cumsum(lens) - lens
    new_lens = lens[order]
    # token k of the sorted batch comes from token perm[k] of the original
    perm = np.repeat(starts[order] - (np.cumsum(new_lens) - new_lens), new_lens) + np.arange(int(lens.sum()))
    perm_t = torch.from_numpy(perm)
    tt = batch.token_type_ids
    sorted_batch = replace(batch, input_ids=batch.input_ids[perm_t], positions=batch.positions[perm_t],
                           cu_seqlens=cu_seqlens_from_lengths(new_lens),
                           token_type_ids=None if tt is None else tt[perm_t], order=None)
    key_lens = None if meta.key_lens is None else [meta.key_lens[i] for i in order.tolist()]
    sorted_meta = AttentionMeta.build(sorted_batch.cu_seqlens, meta.max_seqlen, new_lens.tolist(), key_lens)
    return sorted_batch, sorted_meta, perm_t


class CpuRunner:
    """`runner(batch, meta) -> [T, H]` in the model's dtype, rows in the batch's own token order."""

    def __init__(self, encoder: Encoder, options: CpuPathOptions):
        cfg = encoder.config
        self.config, self.options = cfg, options
        self.dtype = options.dtype if options.quantize is None else torch.float32
        if options.quantize == "int8":
            outliers = calibrate_outliers(encoder)

            def lin(m, outlier_channels=True):
                return DynamicInt8Linear(m, outliers.get(m) if outlier_channels else None)
        else:
            def lin(m, outlier_channels=True):
                return make_linear(m, self.dtype)
        emb = encoder.embeddings
        self.word = emb.word.weight.detach().to(self.dtype)
        self.position = None if emb.position is None else emb.position.weight.detach().to(self.dtype)
        self.token_type = None if emb.token_type is None else emb.token_type.weight.detach().to(self.dtype)
        self.emb_norm = _norm_params(emb.norm, self.dtype)
        self.emb_scale = getattr(emb, "scale", 1.0)          # Gemma: sqrt(hidden), rounded to the dtype
        self.layers = [_Layer(l, cfg, lin, self.dtype) for l in encoder.layers]
        rel = encoder.rel_table() if hasattr(encoder, "rel_table") else None
        if rel is not None:
            for ours, l in zip(self.layers, encoder.layers):
                ours.pos_qk = position_projections(rel, l.qkv.weight, l.qkv.bias, l.num_heads, self.dtype)
        self.linear_backend = type(self.layers[0].out).__name__ if self.layers else "none"
        self.final_norm = _norm_params(encoder.final_norm, self.dtype)
        table = encoder.bias_table()
        self.bias_table = None if table is None else table.detach()                  # [H, 2R+1] fp32

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        x = F.embedding(batch.input_ids, self.word)                                  # [T, H]
        if self.emb_scale != 1.0:
            x.mul_(torch.tensor(self.emb_scale).to(x.dtype))
        if self.position is not None:
            x.add_(F.embedding(batch.positions, self.position))
        if self.token_type is not None:
            if batch.token_type_ids is not None:
                x.add_(F.embedding(batch.token_type_ids, self.token_type))
            else:
                x.add_(self.token_type[0])
        return _layer_norm(x, self.emb_norm)

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch, meta: AttentionMeta) -> torch.Tensor:
        if batch.num_tokens == 0:
            return torch.empty(0, self.config.hidden_size, dtype=self.dtype)
        batch, meta, perm = _length_sorted(batch, meta)
        # one QKV buffer for all layers (int8, and batches over BLOCK_ABOVE): a fresh [T, 3H] output per
        # layer is mapped and page-faulted anew every time (42 MB at offline_b128, ~12 ms per first touch)
        big = self.options.quantize or batch.num_tokens > BLOCK_ABOVE
        qkv_out = torch.empty(batch.num_tokens, self.config.qkv_size, dtype=self.dtype) if big else None
        x = run_encoder(CpuPrimitives(self, qkv_out), self, batch, meta)                # [T, H]
        if perm is None:
            return x
        return torch.empty_like(x).index_copy_(0, perm, x)                           # back to batch order

    def describe(self) -> dict:
        f = detect()
        d = {"path": "cpu", "dtype": str(self.dtype).replace("torch.", ""), "quantize": self.options.quantize,
             "linear": self.linear_backend, "threads": torch.get_num_threads(), "isa": f.isa,
             "bf16_native": f.bf16_native, "amx": f.amx_bf16, "int8_native": f.int8_native}
        if f.cap:
            d["isa_cap"] = f.cap
        if self.options.quantize == "int8":
            d["int8_weight_bits"] = 8 if self.layers and self.layers[0].out.weight_qmax == 127 else 7
        return d


def build_runner(model, threads: int | None = None, quantize: str | None = None):
    """The CPU runner for `model` (an engine.Model on CPU). Options not passed here are read from the
    model (`model.threads`, `model.quantize`, set by `packformer.load`)."""
    threads = threads if threads is not None else getattr(model, "threads", None)
    quantize = check_quantize(quantize if quantize is not None else getattr(model, "quantize", None))
    if quantize is not None and model.dtype != torch.float32:
        raise ValueError(f"quantize={quantize!r} quantizes the fp32 weights; load with dtype=None/'float32', "
                         f"not {str(model.dtype).replace('torch.', '')}")
    _set_threads(threads)
    return CpuRunner(model.encoder, CpuPathOptions(dtype=model.dtype, quantize=quantize, threads=threads))


def _set_threads(threads: int | None) -> None:
    if threads is not None or os.environ.get(ENV_THREADS, "").strip():
        apply_threads(threads)
    elif torch.get_num_threads() > resolve_threads(None):
        apply_threads(None)          # more threads than physical cores only adds contention
