"""Attention over packed sequences: each sequence attends only to its own tokens.

- `varlen_attention_ref`: the readable reference (explicit softmax in fp32, one sequence at a time).
- `varlen_attention`: the dispatcher. On CUDA it uses torch's varlen flash attention where the
  installed torch has it, else SDPA over a jagged nested tensor (flash/efficient kernels); on CPU
  it runs SDPA per group of equal-length sequences, so no padding and no [B, L, L] mask is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # torch >= 2.9 ships a varlen flash-attention entry point; `scale=` since 2.10
    import inspect

    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
    _VARLEN_HAS_SCALE = "scale" in inspect.signature(_torch_varlen_attn).parameters
except Exception:  # pragma: no cover - depends on the torch build
    _torch_varlen_attn = None
    _VARLEN_HAS_SCALE = False


@dataclass
class AttentionMeta:
    """What attention needs to know about the packing, computed once per forward (not per layer)."""

    cu_seqlens: torch.Tensor          # [B+1] int32, on the device of the activations
    max_seqlen: int
    seqlens: list[int]                # host copy, used by the CPU path to slice without syncs
    # CPU: sequences grouped by equal length -> (length, [starts]) so one SDPA call serves a group
    groups: list[tuple[int, list[int]]] | None = None

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, seqlens: list[int] | None = None) -> "AttentionMeta":
        if seqlens is None:
            seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        groups = group_by_length(seqlens) if cu_seqlens.device.type == "cpu" else None
        return cls(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen), seqlens=list(seqlens), groups=groups)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q, k, v: [T, H, D] -> [T, H, D]. Plain softmax(q k^T * scale) v per sequence, in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))   # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)       # [H, L, L]
        out[s:e] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


def group_by_length(seqlens: list[int]) -> list[tuple[int, list[int]]]:
    """[B] lengths -> [(length, [token start of each sequence of that length, ascending])], by length.
    Empty sequences are left out: they have no rows to attend from."""
    by_len: dict[int, list[int]] = {}
    start = 0
    for n in seqlens:
        if n:
            by_len.setdefault(n, []).append(start)
        start += n
    return sorted(by_len.items())


def _cpu_grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                      scale: float) -> torch.Tensor:
    # Sequences of the same length are stacked into one [G, H, L, D] SDPA call: exact (no mask, no
    # padding) and far fewer calls than one per sequence on lognormal length mixes (offline_b128: 84
    # calls per layer for 128 sequences). Padded length buckets with a key mask were measured no faster
    # (benchmarks/NOTES-cpu.md): on CPU the kernel time, not the call count, dominates.
    # A group whose sequences lie next to each other (the engine packs chunks sorted by length; the fast
    # path sorts its batches) is read through strided views of q, k, v (which may be views into one
    # fused QKV output) with no gather; otherwise its rows are gathered first.
    t, h, d = q.shape
    groups = meta.groups if meta.groups is not None else group_by_length(meta.seqlens)
    if len(groups) == 1 and len(groups[0][1]) * groups[0][0] == t:
        # one length fills the batch (e.g. padded-style input): SDPA's output is [G, L, H, D] in memory
        length, starts = groups[0]
        qs, ks, vs = (x.view(len(starts), length, h, d).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(t, h, d)
    out = torch.empty_like(q)
    for length, starts in groups:
        g, s = len(starts), starts[0]
        if starts[-1] - s == (g - 1) * length:      # ascending starts, so this means back to back
            e = s + g * length
            qs, ks, vs = (x[s:e].view(g, length, h, d).transpose(1, 2) for x in (q, k, v))  # [G, H, L, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            out[s:e].view(g, length, h, d).copy_(o.transpose(1, 2))
            continue
        idx = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).flatten()  # [G*L]
        qs, ks, vs = (x.index_select(0, idx).view(g, length, h, d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)                       # [G, H, L, D]
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(g * length, h, d))
    return out


def _cuda_nested_sdpa(q, k, v, meta: AttentionMeta, scale: float) -> torch.Tensor:
    offsets = meta.cu_seqlens.to(torch.int64)
    nt = [torch.nested.nested_tensor_from_jagged(t, offsets=offsets, max_seqlen=meta.max_seqlen).transpose(1, 2)
          for t in (q, k, v)]                                                              # [B, H, j, D]
    o = F.scaled_dot_product_attention(*nt, scale=scale)
    return o.transpose(1, 2).values()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                     scale: float | None = None) -> torch.Tensor:
    """q, k, v: [T, H, D] packed; returns [T, H, D]. Tokens attend within their own sequence only."""
    if not (q.shape == k.shape == v.shape) or q.dim() != 3:
        raise ValueError(f"q, k, v must share one [T, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if q.device.type == "cpu":
        return _cpu_grouped_sdpa(q, k, v, meta, scale)
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        # flash attention straight on the packed [T, H, D] views (last dim contiguous, rows strided):
        # no copy, no padding, no [B, L, L] mask; nothing here reads device memory on the host, so it
        # can be captured in a CUDA graph.
        # The flash and cuDNN kernels need head_dim % 8 == 0; other head sizes (d_model 60 / 5 heads)
        # take the per-sequence path below, where SDPA picks a kernel that supports them.
        if q.shape[-1] % 8 == 0:
            if _torch_varlen_attn is not None and (_VARLEN_HAS_SCALE or scale == 1.0 / math.sqrt(q.shape[-1])):
                cu = meta.cu_seqlens
                kw = {"scale": scale} if _VARLEN_HAS_SCALE else {}
                return _torch_varlen_attn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, **kw)
            return _cuda_nested_sdpa(q, k, v, meta, scale)
    # fp32 on CUDA (flash kernels need half precision), odd head sizes, or another device: the exact
    # per-sequence path still works; it only needs the host-side lengths that `meta` already carries.
    return _cpu_grouped_sdpa_any_device(q, k, v, meta, scale)


def _cpu_grouped_sdpa_any_device(q, k, v, meta: AttentionMeta, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for n in meta.seqlens:
        if n:
            qs, ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out[start:start + n] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
        start += n
    return out
