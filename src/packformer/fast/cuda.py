"""CUDA fast path: the same encoder as model.py, run with fused kernels, varlen flash attention and
CUDA graphs per token-count bucket (graphs.py). Applied outside the readable model: it reads the
model's own (already fp16/bf16) parameters and never changes them.

Per post-norm layer:  x [T, H]
  qkv = x W_qkv^T + b                 cuBLAS (bias in its epilogue)       [T, 3H]
  a   = flash_varlen(q, k, v)         Triton flash attention on packed tokens (64-row tiles)  [T, nh, hd]
  x   = LN(x + a W_o^T + b_o)         `addmm_` (residual in the GEMM) + fused bias+LayerNorm kernel
  h   = act(x W_1^T + b_1)            T >= 16384 on Hopper: the Triton TMA GEMM with a bias+erf-GELU epilogue;
                                      else cuBLAS, then the bias_act kernel or a cuBLASLt epilogue (ReLU, tanh)
  x   = LN(x + h W_2^T + b_2)         as for the out-projection
Pre-norm stacks use the same kernels in the other order (dataflow.py writes the order once); RoPE is one
in-place pass over q and k (flash_varlen can turn them itself: `fuse_rotary`, measured slower);
relative-position biases and local windows are applied inside flash_varlen, DeBERTa's disentangled
terms in a kernel of their own (ops/disentangled_flash.py), GLU feed-forwards take one elementwise pass
(ops/glu.py). Decoder-style encoders (Qwen3, Gemma 3):
RMSNorms fused with the bias, Gemma's sandwich norm and the residual add after each GEMM
(ops/rmsnorm.py), per-head q/k norms and rotary in one in-place pass (ops/qk_norm_rotary.py), causal
masks and grouped kv heads inside flash_varlen (kv heads read in place, never expanded), and the
embedding scale in the embeddings' dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..batch import PackedBatch
from ..dataflow import Context, Primitives, build_context, run_encoder
from ..model import Encoder, RMSNorm
from ..ops._triton import INTERPRET
from ..ops.attention import AttentionMeta, check_no_key_lens, split_qkv, varlen_attention
from ..ops.disentangled import distance_index, position_projections
from ..ops.disentangled_flash import disentangled_flash
from ..ops.embedding import embed_layernorm
from ..ops.gelu import bias_act
from ..ops.glu import glu
from ..ops.rotary import apply_rotary_
from ..ops.layernorm import add_layernorm
from ..ops.qk_norm_rotary import qk_norm_rotary_
from ..ops.rmsnorm import add_rmsnorm
from ..ops.flash_varlen import default_config as flash_config
from ..ops.flash_varlen import flash_varlen, rotary_fused, tile_table
from ..ops.linear_act import linear_act_tma

log = logging.getLogger(__name__)


# FFN1 goes through the TMA GEMM (bias + activation in its epilogue) from this many tokens on; on smaller
# batches cuBLAS followed by the bias_act kernel measured faster on an H100/H200 (benchmarks/NOTES-gpu.md).
TMA_MIN_TOKENS = 16384


@dataclass
class FastOptions:
    """How `build_runner` runs the fused encoder: `graphs` replays a CUDA graph per token bucket for
    batches of up to `graph_max_tokens` tokens (larger ones run eagerly); `graphs=False` runs every batch
    eagerly, which holds no graph memory and shows each kernel on its own in a profiler."""

    graphs: bool = True
    graph_max_tokens: int = 8192

    def __post_init__(self):
        if self.graph_max_tokens < 1:
            raise ValueError(f"graph_max_tokens must be at least 1, got {self.graph_max_tokens}")


def _stacked_projections(rel: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(pq, pk) as views of one [2, nh, 2k, d] buffer, pk first: the kernel's two position tables then come
    from one batched GEMM (ops/disentangled_flash.position_scores)."""
    pq, pk = position_projections(rel, layer.qkv.weight, layer.qkv.bias, layer.num_heads)
    both = torch.stack((pk, pq))
    return both[1], both[0]


class FastEncoder:
    """Callable `(PackedBatch on device, AttentionMeta, out=None) -> [T, H]` over `encoder`'s weights:
    the one dataflow (dataflow.py) over CudaPrimitives."""

    def __init__(self, encoder: Encoder, fp8: bool = False):
        self.encoder = encoder
        self.cfg = encoder.config
        p = next(encoder.parameters())
        # on a CPU only under Triton's interpreter, where the tests run this path's kernels on tiny models
        on_device = p.device.type == "cuda" or (INTERPRET and p.device.type == "cpu")
        if not on_device or p.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the CUDA fast path runs fp16/bf16 weights on a GPU, got {p.dtype} on {p.device}")
        self.dtype, self.device = p.dtype, p.device
        # the TMA GEMM needs Hopper (sm90+) and 16-byte aligned rows (hidden and FFN sizes multiples of 8)
        self._tma = (p.is_cuda and torch.cuda.get_device_capability(self.device)[0] >= 9
                     and self.cfg.hidden_size % 8 == 0 and self.cfg.intermediate_size % 8 == 0)
        # one flash_varlen tile config for every forward, so the tile table always matches the kernel
        self._flash = flash_config(self.cfg.head_dim, self.cfg.max_tokens_per_sequence)
        # DeBERTa's kernel: the same query blocks (so the same tile table), 16 keys per step (its gathers
        # per step halve: 0.78 vs 0.82-0.85 ms per layer on offline_b256, H200, NOTES-gpu.md)
        self._disentangled_flash = replace(self._flash, block_n=16)
        table = encoder.bias_table()
        self.bias_table = None if table is None else table.detach()                         # [H, 2R+1] fp32
        # DeBERTa: each layer's q / k projections of the relative embeddings [nh, 2k, d] (weights only: once)
        rel = encoder.rel_table() if hasattr(encoder, "rel_table") else None
        self.pos_qk = None if rel is None else [_stacked_projections(rel, l) for l in encoder.layers]
        if self.cfg.disentangled is not None:   # its distance index, on the device before any graph capture
            distance_index(self.cfg.disentangled, self.cfg.max_tokens_per_sequence, self.device, torch.int32)
        if fp8:             # e4m3 GEMMs over weights quantized here, once (fast/fp8.py)
            from .fp8 import Fp8Primitives

            self.primitives = Fp8Primitives(self)
        else:
            self.primitives = CudaPrimitives(self)
        self.fp8 = fp8

    def describe(self) -> dict:
        d = {"tma_ffn1": self._tma}
        if self.fp8:
            d["gemm"] = self.primitives.describe()
        return d

    def __call__(self, batch: PackedBatch, meta: AttentionMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        if batch.num_tokens == 0:
            return torch.empty(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        y = run_encoder(self.primitives, self.encoder, batch, meta, out)
        return y if isinstance(y, torch.Tensor) else y.x       # fp8: a LayerNorm's output, quantized too

    def tiles(self, meta: AttentionMeta) -> torch.Tensor | None:
        """The query-block table of flash_varlen, once per forward, where the host knows the lengths
        (not while a CUDA graph is captured: there the kernel finds its blocks from cu_seqlens)."""
        if not meta.seqlens:
            return None
        table = torch.from_numpy(tile_table(meta.seqlens, self._flash.block_m))
        # a few KB from pageable memory: the driver stages it at once, with no wait on the device;
        # pinning it first cost ~1.7 ms per forward on an H200 host
        return table.to(self.device, non_blocking=True)


def _rotary_in_attention(layer) -> bool:
    """Whole-head RoPE with no per-head norm before it (Qwen3 turns q and k in its norm pass) and no
    disentangled terms: what flash_varlen can turn itself as it reads q and k."""
    return (layer.rotary is not None and getattr(layer, "q_norm", None) is None
            and getattr(layer, "disentangled", None) is None and rotary_fused(layer.rotary, layer.head_dim))


def _is_rms(norm) -> bool:
    return isinstance(norm, RMSNorm)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """model.RMSNorm (weight only) over the last dim, in x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _rms_or_none(*norms) -> bool:
    return all(n is None or _is_rms(n) for n in norms)


class CudaPrimitives(Primitives):
    """The dataflow's primitives as fused kernels; norms and linears are the modules themselves."""

    # RoPE turned inside flash_varlen as it reads q and k (whole-head rotaries) instead of the in-place pass
    # over the QKV buffer. Off: every query block re-turns the keys it reads, which costs more than the pass
    # (H200: offline_b256 attention 237 us against 64 + 135 per layer; whole models 0-6% slower; only batches
    # of one query block per sequence gain, 3%: benchmarks/NOTES-gpu.md). One choice per model, never per
    # batch: the two differ by a rounding, and a sequence's result must not depend on its batch.
    fuse_rotary = False

    def __init__(self, fast: FastEncoder):
        self.fast = fast

    # the GEMMs of the dataflow (fast/fp8.py runs them in e4m3)
    def linear(self, x: torch.Tensor, lin, bias: bool = True) -> torch.Tensor:
        return F.linear(x, lin.weight, lin.bias if bias else None)                        # [T, N]

    def linear_add_(self, x: torch.Tensor, lin, residual: torch.Tensor) -> torch.Tensor:
        """residual += x W^T (no bias), in place, in the GEMM."""
        return residual.addmm_(x, lin.weight.t())

    def layernorm(self, s: torch.Tensor, norm, **kw):
        """add_layernorm for project_add_norm's LayerNorms (kw: x_bias, out, return_sum, sum_out)."""
        return add_layernorm(s, norm.weight, norm.bias, norm.eps, **kw)

    def rmsnorm(self, s: torch.Tensor, weight, eps: float, **kw):
        """add_rmsnorm for project_add_norm's RMSNorms (kw: residual, x_bias, post_weight, post_eps,
        return_sum, out, sum_out)."""
        return add_rmsnorm(s, weight, eps, **kw)

    def context(self, batch: PackedBatch, meta: AttentionMeta) -> Context:
        ctx = build_context(self.fast.cfg, batch, meta, self.fast.bias_table)
        ctx.tiles = self.fast.tiles(meta)
        return ctx

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        emb = self.fast.encoder.embeddings
        norm = emb.norm
        scale = getattr(emb, "scale", 1.0)
        if scale != 1.0 or (norm is not None and _is_rms(norm)):   # Gemma: scaled, no position table
            x = F.embedding(batch.input_ids, emb.word.weight)                                  # [T, H]
            if scale != 1.0:
                x = x * torch.tensor(scale).to(x.dtype)
            if emb.position is not None:
                x = x + F.embedding(batch.positions, emb.position.weight)
            if emb.token_type is not None:
                x = x + (emb.token_type.weight[0] if batch.token_type_ids is None
                         else F.embedding(batch.token_type_ids, emb.token_type.weight))
            return self.norm(x, norm)
        return embed_layernorm(batch.input_ids, batch.positions, batch.token_type_ids, emb.word.weight,
                               emb.position.weight if emb.position is not None else None,
                               emb.token_type.weight if emb.token_type is not None else None,
                               norm.weight if norm is not None else None, norm.bias if norm is not None else None,
                               norm.eps if norm is not None else 0.0)                          # [T, H]

    def norm(self, x, norm):
        if norm is None:
            return x
        if _is_rms(norm):
            return add_rmsnorm(x, norm.weight, norm.eps)
        return add_layernorm(x, norm.weight, norm.bias, norm.eps)

    def attention(self, layer, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        qkv = self.linear(h, layer.qkv)                                                    # [T, (nh + 2 nkv) hd]
        t = qkv.shape[0]
        rotary = None
        q, k, v = split_qkv(qkv, layer.num_heads, getattr(layer, "kv_heads", layer.num_heads),
                            layer.head_dim)                                                 # [T, nh|nkv, hd]
        if getattr(layer, "q_norm", None) is not None and layer.rotary is not None:    # in place, one pass
            cos, sin = ctx.rotary[layer.rotary]
            qk_norm_rotary_(q, k, layer.q_norm.weight, layer.k_norm.weight, layer.q_norm.eps, cos, sin, layer.rotary)
        elif getattr(layer, "q_norm", None) is not None:          # per-head RMSNorm without rotary (new tensors)
            q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
        elif layer.rotary is not None:
            cos, sin = ctx.rotary[layer.rotary]
            if self.fuse_rotary and ctx.meta.key_lens is None and _rotary_in_attention(layer):
                rotary = (cos, sin, layer.rotary)          # turned inside flash_varlen as it reads q and k
            else:
                apply_rotary_(q, k, cos, sin, layer.rotary)
        if getattr(layer, "disentangled", None) is not None:
            check_no_key_lens(ctx.meta)
            pq, pk = self.fast.pos_qk[layer.index]
            return disentangled_flash(q, k, v, ctx.meta.cu_seqlens, ctx.meta.max_seqlen, pq, pk, layer.disentangled,
                                      config=self.fast._disentangled_flash, tiles=ctx.tiles).view(t, -1)  # [T, H]
        pb = ctx.bias_for(layer)
        if ctx.meta.key_lens is not None:         # visible-key prefixes (ColBERT query expansion): SDPA per group
            return varlen_attention(q, k, v, ctx.meta, scale=getattr(layer, "scale", None), bias=pb).view(t, -1)
        return flash_varlen(q, k, v, ctx.meta.cu_seqlens, ctx.meta.max_seqlen, scale=getattr(layer, "scale", None),
                            config=self.fast._flash, tiles=ctx.tiles, bias_table=None if pb is None else pb.table,
                            window=0 if pb is None else pb.window,
                            causal=False if pb is None else pb.causal, rotary=rotary).view(t, -1)  # [T, nh hd]

    def ffn_hidden(self, layer, x: torch.Tensor) -> torch.Tensor:
        w, b, act = layer.ffn1.weight, layer.ffn1.bias, layer.act
        if layer.glu:
            return glu(F.linear(x, w, b), act)                                              # [T, F]
        if act == "relu" or act == "gelu_tanh":
            # cuBLASLt's RELU_BIAS / GELU_BIAS epilogues (its GELU is the tanh form): no extra pass
            return torch._addmm_activation(b, x, w.t(), use_gelu=act != "relu")
        if self.fast._tma and x.shape[0] >= TMA_MIN_TOKENS and x.is_contiguous() and act == "gelu":
            return linear_act_tma(x, w, b, act)                                             # [T, F]
        h = F.linear(x, w)                                                                  # [T, F]
        return bias_act(h, b, act, out=h)                                                   # erf GELU, in place

    def project_add_norm(self, a, lin, residual, norm, keep_sum=False, out=None, post=None):
        """residual += a W^T in the GEMM; the bias add is fused into the LayerNorm kernel. RMSNorms (and
        Gemma's sandwich norm `post` on the GEMM output) take one add_rmsnorm pass after the GEMM."""
        if (post is not None or (norm is not None and _is_rms(norm))) and _rms_or_none(post, norm):
            w, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
            if post is None:
                s = self.linear_add_(a, lin, residual)                                      # [T, H]
                y, s = self.rmsnorm(s, w, eps, x_bias=lin.bias, return_sum=True, out=out, sum_out=s)
            else:
                g = self.linear(a, lin, bias=False)                                         # [T, H]
                y, s = self.rmsnorm(g, w, eps, residual=residual, x_bias=lin.bias, post_weight=post.weight,
                                    post_eps=post.eps, return_sum=True, out=out, sum_out=residual)
            return (s, y) if keep_sum else y
        if post is not None or (norm is not None and _is_rms(norm)):    # a LayerNorm beside a sandwich norm
            if post is not None:
                s = residual.add_(self.norm(self.linear(a, lin), post))                          # [T, H]
            else:
                s = self.linear_add_(a, lin, residual)
                if lin.bias is not None:
                    s.add_(lin.bias)
            y = self.norm(s, norm)
            if out is not None:
                y = out.copy_(y)
            return (s, y) if keep_sum else y
        s = self.linear_add_(a, lin, residual)                                              # [T, H]
        if norm is None:
            if lin.bias is not None:
                s.add_(lin.bias)
            y = s if out is None else out.copy_(s)
            return (s, y) if keep_sum else y
        if not keep_sum:
            return self.layernorm(s, norm, x_bias=lin.bias, out=out)
        y, s = self.layernorm(s, norm, x_bias=lin.bias, return_sum=True, out=out, sum_out=s)
        return s, y


def build_runner(model, options: FastOptions | None = None):
    """The fastest runner for `model` on CUDA: FastEncoder (+ graphs) for fp16/bf16; the reference
    encoder for fp32 (flash attention needs half precision; fp32 on a GPU is a correctness mode)."""
    if model.dtype not in (torch.float16, torch.bfloat16):
        log.info("CUDA fast path needs fp16/bf16 (got %s): running the reference encoder", model.dtype)
        return model.encoder
    opt = options or FastOptions()
    fast = FastEncoder(model.encoder, fp8=getattr(model, "fp8", False))
    if not opt.graphs:
        return fast
    from .graphs import GraphRunner

    return GraphRunner(fast, max_tokens=opt.graph_max_tokens,
                       max_seqlen=model.config.max_tokens_per_sequence, hidden=model.config.hidden_size)
