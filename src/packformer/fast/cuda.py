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
Pre-norm stacks (nn.TransformerEncoder norm_first=True) use the same kernels in the other order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import PackedBatch
from ..model import Encoder
from ..ops.attention import AttentionMeta
from ..ops.embedding import embed_layernorm
from ..ops.gelu import bias_act
from ..ops.layernorm import add_layernorm
from ..ops.flash_varlen import default_config as flash_config
from ..ops.flash_varlen import flash_varlen, tile_table
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


class FastEncoder:
    """Callable `(PackedBatch on device, AttentionMeta, out=None) -> [T, H]` over `encoder`'s weights."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.cfg = encoder.config
        p = next(encoder.parameters())
        if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the CUDA fast path runs fp16/bf16 weights on a GPU, got {p.dtype} on {p.device}")
        self.dtype, self.device = p.dtype, p.device
        # the TMA GEMM needs Hopper (sm90+) and 16-byte aligned rows (hidden and FFN sizes multiples of 8)
        self._tma = (torch.cuda.get_device_capability(self.device)[0] >= 9 and self.cfg.hidden_size % 8 == 0
                     and self.cfg.intermediate_size % 8 == 0)
        # one flash_varlen tile config for every forward, so the tile table always matches the kernel
        self._flash = flash_config(self.cfg.head_dim, self.cfg.max_tokens_per_sequence)

    def describe(self) -> dict:
        return {"tma_ffn1": self._tma}

    def __call__(self, batch: PackedBatch, meta: AttentionMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        cfg, emb = self.cfg, self.encoder.embeddings
        t = batch.num_tokens
        if t == 0:
            return torch.empty(0, cfg.hidden_size, dtype=self.dtype, device=self.device)
        norm = emb.norm
        x = embed_layernorm(batch.input_ids, batch.positions, batch.token_type_ids, emb.word.weight,
                            emb.position.weight, emb.token_type.weight if emb.token_type is not None else None,
                            norm.weight if norm is not None else None, norm.bias if norm is not None else None,
                            norm.eps if norm is not None else 0.0)                          # [T, H]
        layers = self.encoder.layers
        tiles = self._tiles(meta)
        if cfg.norm_first:
            return self._pre_norm(x, meta, tiles, out)
        for i, layer in enumerate(layers):
            last = out if i == len(layers) - 1 else None
            x = self._sublayer(x, self._attention(layer, x, meta, tiles), layer.out, layer.norm1, None)
            x = self._sublayer(x, self._ffn_hidden(layer, x), layer.ffn2, layer.norm2, last)
        return x

    # ---- steps --------------------------------------------------------------------------------
    def _tiles(self, meta: AttentionMeta) -> torch.Tensor | None:
        """The query-block table of flash_varlen, once per forward, where the host knows the lengths
        (not while a CUDA graph is captured: there the kernel finds its blocks from cu_seqlens)."""
        if not meta.seqlens:
            return None
        table = torch.from_numpy(tile_table(meta.seqlens, self._flash.block_m))
        # a few KB from pageable memory: the driver stages it at once, with no wait on the device;
        # pinning it first cost ~1.7 ms per forward on an H200 host
        return table.to(self.device, non_blocking=True)

    def _attention(self, layer, x: torch.Tensor, meta: AttentionMeta, tiles: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias)                              # [T, 3H]
        q, k, v = qkv.view(t, 3, layer.num_heads, layer.head_dim).unbind(1)                 # 3 x [T, nh, hd]
        return flash_varlen(q, k, v, meta.cu_seqlens, meta.max_seqlen, config=self._flash,
                            tiles=tiles).view(t, -1)                                        # [T, H]

    def _ffn_hidden(self, layer, x: torch.Tensor) -> torch.Tensor:
        w, b, act = layer.ffn1.weight, layer.ffn1.bias, layer.act
        if act == "relu" or act == "gelu_tanh":
            # cuBLASLt's RELU_BIAS / GELU_BIAS epilogues (its GELU is the tanh form): no extra pass
            return torch._addmm_activation(b, x, w.t(), use_gelu=act != "relu")
        if self._tma and x.shape[0] >= TMA_MIN_TOKENS and x.is_contiguous():
            return linear_act_tma(x, w, b, act)                                             # [T, F]
        h = F.linear(x, w)                                                                  # [T, F]
        return bias_act(h, b, act, out=h)                                                   # erf GELU, in place

    def _sublayer(self, x: torch.Tensor, a: torch.Tensor, lin, norm, out) -> torch.Tensor:
        """Post-norm: LN(x + a W^T + b). x is our own activation, so it may be overwritten."""
        s = x.addmm_(a, lin.weight.t())                                                     # x += a W^T
        return add_layernorm(s, norm.weight, norm.bias, norm.eps, x_bias=lin.bias, out=out)

    def _pre_norm(self, x: torch.Tensor, meta: AttentionMeta, tiles, out) -> torch.Tensor:
        """x <- x + attn(LN1 x); x <- x + ffn(LN2 x); with each add fused into the next LayerNorm."""
        layers, final = self.encoder.layers, self.encoder.final_norm
        h = add_layernorm(x, layers[0].norm1.weight, layers[0].norm1.bias, layers[0].norm1.eps)
        for i, layer in enumerate(layers):
            x, h = self._pre_sublayer(x, self._attention(layer, h, meta, tiles), layer.out, layer.norm2, None)
            nxt = layers[i + 1].norm1 if i + 1 < len(layers) else final
            f = self._ffn_hidden(layer, h)
            if nxt is None:   # last layer, no final norm: the plain residual sum is the output
                o = torch.addmm(layer.ffn2.bias, f, layer.ffn2.weight.t())
                return torch.add(x, o, out=out) if out is not None else x.add_(o)
            last = out if nxt is final else None
            x, h = self._pre_sublayer(x, f, layer.ffn2, nxt, last)
        return h

    def _pre_sublayer(self, x, a, lin, norm, out):
        """(x + a W^T + b, LN(x + a W^T + b)); the sum overwrites x (our own residual stream)."""
        s = x.addmm_(a, lin.weight.t())
        y, s = add_layernorm(s, norm.weight, norm.bias, norm.eps, x_bias=lin.bias, return_sum=True,
                             out=out, sum_out=s)
        return s, y


def build_runner(model, options: FastOptions | None = None):
    """The fastest runner for `model` on CUDA: FastEncoder (+ graphs) for fp16/bf16; the reference
    encoder for fp32 (flash attention needs half precision; fp32 on a GPU is a correctness mode)."""
    if model.dtype not in (torch.float16, torch.bfloat16):
        log.info("CUDA fast path needs fp16/bf16 (got %s): running the reference encoder", model.dtype)
        return model.encoder
    opt = options or FastOptions()
    fast = FastEncoder(model.encoder)
    if not opt.graphs:
        return fast
    from .graphs import GraphRunner

    return GraphRunner(fast, max_tokens=opt.graph_max_tokens,
                       max_seqlen=model.config.max_tokens_per_sequence, hidden=model.config.hidden_size)
