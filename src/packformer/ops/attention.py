"""Attention over packed sequences: each sequence attends only to its own tokens.

- `PositionBias`: optional terms that depend only on the (query, key) positions inside a sequence: a
  learned relative-position bias per head (MPNet), a local window (ModernBERT's local layers) and/or a
  causal mask (decoder-style encoders: Qwen3).
- Grouped-query attention: k and v may have fewer heads than q (q head h reads kv head h // (Hq / Hkv));
  they are never expanded in memory on the fast paths (CPU SDPA's enable_gqa, flash_varlen's head map).
- `varlen_attention_ref`: the readable reference (explicit softmax in fp32, one sequence at a time, in
  chunks of queries: never an [H, L, L] score matrix).
- `varlen_attention`: the dispatcher. On CUDA it uses torch's varlen flash attention where the
  installed torch has it, else SDPA over a jagged nested tensor (flash/efficient kernels); with a
  `PositionBias` it uses our Triton `flash_varlen`, since torch's varlen/nested kernels take no bias.
  On CPU it runs SDPA per group of equal-length sequences, so no padding and no [B, L, L] mask is ever
  built; a `PositionBias` becomes one [1, H, L, L] mask per group, shared by its sequences.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # torch >= 2.9 ships a varlen flash-attention entry point; `scale=` since 2.10
    import inspect

    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
    _VARLEN_HAS_SCALE = "scale" in inspect.signature(_torch_varlen_attn).parameters
except Exception:  # pragma: no cover - depends on the torch build
    _torch_varlen_attn = None
    _VARLEN_HAS_SCALE = False


def _is_window(w) -> bool:
    return isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0


@dataclass(frozen=True, eq=False)
class PositionBias:
    """Attention terms that depend only on the (query, key) positions inside one sequence.

    Positions are token index minus the sequence's start, so cu_seqlens is all the packing they need.
    Compared by identity (a tensor has no single truth value); `AttentionMeta.masks_for` caches by table."""

    # [H, 2R+1] fp32 on the activations' device: score(i, j) += table[h, clamp(j - i, -R, R) + R]
    table: torch.Tensor | None = None
    window: int = 0                     # > 0: query i sees key j only when |j - i| <= window
    causal: bool = False                # query i sees key j only when j <= i

    def __post_init__(self) -> None:
        if not _is_window(self.window):
            raise ValueError(f"PositionBias.window must be an int >= 0 (0: no window), got {self.window!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"PositionBias.causal must be a bool, got {self.causal!r}")
        object.__setattr__(self, "window", int(self.window))    # a numpy integer from a config, say
        t = self.table
        if t is not None and not (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] % 2 == 1
                                  and t.dtype == torch.float32):
            what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"PositionBias.table must be an fp32 [H, 2R+1] tensor, got {what}")

    @property
    def radius(self) -> int:
        """R: relative positions beyond +-R share the table's last (first) column."""
        return 0 if self.table is None else (self.table.shape[1] - 1) // 2

    @property
    def active(self) -> bool:
        return self.table is not None or self.window > 0 or self.causal

    @property
    def causal_only(self) -> bool:
        """Only the causal mask: SDPA's is_causal serves it with no mask tensor."""
        return self.causal and self.table is None and self.window == 0


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection [T, (heads + 2 kv_heads) d], rows [q; k; v] -> views q [T, heads, d], k and v
    [T, kv_heads, d] (strided rows, contiguous heads)."""
    t = qkv.shape[0]
    if kv_heads == heads:
        return qkv.view(t, 3, heads, head_dim).unbind(1)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    return q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [T, Hq, D], k and v [T, Hkv, D] with Hq a multiple of Hkv."""
    ok = (q.dim() == 3 and k.shape == v.shape and k.dim() == 3 and k.shape[0] == q.shape[0]
          and k.shape[2] == q.shape[2] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)
    if not ok:
        raise ValueError(f"q, k, v must share one [T, H, D] shape (k and v may have Hkv heads, H a multiple of "
                         f"Hkv), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _check_bias(bias: PositionBias | None, q: torch.Tensor) -> PositionBias | None:
    """The bias to apply to q's heads, or None when there is nothing to add (no table, no window)."""
    if bias is None:
        return None
    if not isinstance(bias, PositionBias):
        raise ValueError(f"bias must be a PositionBias, got {type(bias).__name__}")
    t = bias.table
    if t is not None and (t.shape[0] != q.shape[1] or t.device != q.device):
        raise ValueError(f"PositionBias.table must be [H={q.shape[1]}, 2R+1] on {q.device}, "
                         f"got {tuple(t.shape)} on {t.device}")
    return bias if bias.active else None


def position_mask(bias: PositionBias, length: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, H, L, L] (window / causal alone: [1, 1, L, L]) additive mask for one sequence of `length` tokens:
    table[h, clamp(j - i, -R, R) + R], -inf where |j - i| > window, and -inf where j > i if causal. It
    depends on the length only, and the mask for a shorter length is its top-left corner. On the table's
    device, else on `device`."""
    device = bias.table.device if bias.table is not None else device
    return block_mask(bias, 0, length, 0, length, dtype, device)


def block_mask(bias: PositionBias, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """position_mask's rows [q0, q1) and columns [k0, k1): [1, H|1, q1-q0, k1-k0]. It depends on k0 - q0
    and the two sizes only, so every interior block of a long sequence shares one."""
    device = bias.table.device if bias.table is not None else device
    rel = (torch.arange(k0, k1, device=device)[None, :]
           - torch.arange(q0, q1, device=device)[:, None])              # [Lq, Lk] key minus query position
    if bias.table is not None:
        r = bias.radius
        mask = bias.table[:, rel.clamp(-r, r) + r].to(dtype)              # [H, L, L]
    else:
        mask = torch.zeros(1, *rel.shape, dtype=dtype, device=device)
    if bias.window > 0:
        mask.masked_fill_(rel.abs() > bias.window, float("-inf"))
    if bias.causal:
        mask.masked_fill_(rel > 0, float("-inf"))
    return mask.unsqueeze(0)


@dataclass
class AttentionMeta:
    """What attention needs to know about the packing, computed once per forward (not per layer)."""

    cu_seqlens: torch.Tensor          # [B+1] int32, on the device of the activations
    max_seqlen: int
    seqlens: list[int]                # host copy, used by the CPU path to slice without syncs
    # CPU: sequences grouped by equal length -> (length, [starts]) so one SDPA call serves a group
    groups: list[tuple[int, list[int]]] | None = None
    # CPU with a PositionBias: one mask at the batch's longest length per (table, window, dtype), built
    # by the first layer and sliced by every group of every layer (see `masks_for`)
    masks: dict = field(default_factory=dict, repr=False, compare=False)
    # per sequence, how many of its leading tokens every token may attend to (None: all of them). ColBERT's
    # query expansion: [MASK] tokens after the text attend to the text, and nothing attends to them
    key_lens: list[int] | None = None

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, seqlens: list[int] | None = None,
              key_lens: list[int] | None = None) -> "AttentionMeta":
        if seqlens is None:
            seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if key_lens is not None:
            key_lens = [int(k) for k in key_lens]
            if len(key_lens) != len(seqlens) or any(not 0 < k <= n for k, n in zip(key_lens, seqlens) if n):
                raise ValueError(f"key_lens must give each of the {len(seqlens)} sequences 1..length visible keys, "
                                 f"got {key_lens} for lengths {list(seqlens)}")
        groups = group_by_length(seqlens) if cu_seqlens.device.type == "cpu" else None
        return cls(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen), seqlens=list(seqlens), groups=groups,
                   key_lens=key_lens)

    def masks_for(self, bias: PositionBias, length: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """`position_mask(bias, n)` for any n <= length, as the [..., :n, :n] corner of the returned mask.
        Cached on this meta: a forward's layers share it (MPNet's table is shared across layers;
        ModernBERT's local layers share one window), so it is built once per forward, not per layer or
        per length group, and it holds no more memory than the longest group's own mask would."""
        t = bias.table
        key = (id(t), bias.window, bias.causal, dtype, str(device))
        version = 0 if t is None or t.is_inference() else t._version   # an in-place update rebuilds
        hit = self.masks.get(key)
        # the entry keeps its table: a new tensor that reuses a freed one's id never matches
        if hit is None or hit[0] is not t or hit[1] != version or hit[2].shape[-1] < length:
            hit = (t, version, position_mask(bias, length, dtype, device))
            self.masks[key] = hit
        return hit[2]


# varlen_attention_ref's scores for one chunk of queries hold at most about this many elements (32 MiB of
# fp32): [H, C, L] with C = this / (H * L), never [H, L, L] (1 GiB per 4 heads at 8,192 tokens). Each chunk's
# softmax spans all of its sequence's keys, so chunking changes no result; short sequences are one chunk.
REF_SCORE_ELEMENTS = 1 << 23


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float | None = None, bias: PositionBias | None = None) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, Hkv, D] -> [T, H, D]. Plain softmax(q k^T * scale + bias) v per sequence, in
    fp32; the bias (if any) adds table[h, clamp(j - i, -R, R) + R] to score(i, j), -inf where |j - i| > window
    and -inf where j > i if causal, after the scaling, as HF MPNet adds its position bias. Grouped kv heads
    are repeated here (the readable form). Queries go in chunks (REF_SCORE_ELEMENTS)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:                      # q head h reads kv head h // group
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bias = _check_bias(bias, q)
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))   # [H, L, D]
        pos = torch.arange(e - s, device=q.device)
        step = max(1, REF_SCORE_ELEMENTS // (q.shape[1] * (e - s)))
        for c0 in range(0, e - s, step):
            c1 = min(e - s, c0 + step)
            scores = qs[:, c0:c1] @ ks.transpose(-1, -2) * scale            # [H, C, L]
            if bias is not None:
                rel = pos[None, :] - pos[c0:c1, None]                       # [C, L] key minus query position
                if bias.table is not None:
                    r = bias.radius
                    scores = scores + bias.table.float()[:, rel.clamp(-r, r) + r]
                if bias.window > 0:
                    scores = scores.masked_fill(rel.abs() > bias.window, float("-inf"))
                if bias.causal:
                    scores = scores.masked_fill(rel > 0, float("-inf"))
            p = torch.softmax(scores, dim=-1)                               # [H, C, L]
            out[s + c0:s + c1] = (p @ vs).transpose(0, 1).to(q.dtype)
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
                      scale: float, bias: PositionBias | None = None) -> torch.Tensor:
    # Sequences of the same length are stacked into one [G, H, L, D] SDPA call: exact (no mask, no
    # padding) and far fewer calls than one per sequence on lognormal length mixes (offline_b128: 84
    # calls per layer for 128 sequences). Padded length buckets with a key mask were measured no faster
    # (benchmarks/NOTES-cpu.md): on CPU the kernel time, not the call count, dominates.
    # A group whose sequences lie next to each other (the engine packs chunks sorted by length; the fast
    # path sorts its batches) is read through strided views of q, k, v (which may be views into one
    # fused QKV output) with no gather; otherwise its rows are gathered first.
    # A PositionBias is the same for every sequence of one length: the group's SDPA call gets one
    # [1, H, L, L] fp32 mask (broadcast over G), the corner of the meta's cached mask (`masks_for`).
    if meta.key_lens is not None:
        return _prefix_keys_sdpa(q, k, v, meta, scale, bias)
    t, h, d = q.shape
    groups = meta.groups if meta.groups is not None else group_by_length(meta.seqlens)
    bias = _check_bias(bias, q)
    causal = bias is not None and bias.causal
    big = None
    masked = [n for n, _ in groups if bias is not None and _needs_mask(bias, n) and not _windowed(bias, n)]
    if masked:
        big = meta.masks_for(bias, max(masked), device=q.device)           # [1, H|1, Lmax, Lmax]

    def attend(qs, ks, vs, length):                                       # [G, H, L, D] -> [G, H, L, D]
        if bias is not None and _windowed(bias, length):
            return _windowed_sdpa(qs, ks, vs, bias, scale)
        return _sdpa(qs, ks, vs, _group_mask(big, bias, length), scale, causal)

    if len(groups) == 1 and len(groups[0][1]) * groups[0][0] == t:
        # one length fills the batch (e.g. padded-style input): SDPA's output is [G, L, H, D] in memory
        length, starts = groups[0]
        qs, ks, vs = (x.view(len(starts), length, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        return attend(qs, ks, vs, length).transpose(1, 2).reshape(t, h, d)
    out = torch.empty_like(q)
    for length, starts in groups:
        g, s = len(starts), starts[0]
        if starts[-1] - s == (g - 1) * length:      # ascending starts, so this means back to back
            e = s + g * length
            qs, ks, vs = (x[s:e].view(g, length, x.shape[1], d).transpose(1, 2) for x in (q, k, v))  # [G, H, L, D]
            out[s:e].view(g, length, h, d).copy_(attend(qs, ks, vs, length).transpose(1, 2))
            continue
        idx = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).flatten()  # [G*L]
        qs, ks, vs = (x.index_select(0, idx).view(g, length, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        o = attend(qs, ks, vs, length)                                                     # [G, H, L, D]
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(g * length, h, d))
    return out


# A windowed sequence this long runs in blocks of queries (below): each block sees only the keys its window
# reaches, instead of all L keys under an [L, L] mask (256 MiB and 64x the work at 8,192 tokens for
# ModernBERT's +-64 window).
WINDOW_BLOCK = 128      # queries per block (at least the window)


def _window_block(window: int) -> int:
    return max(WINDOW_BLOCK, window)


def _windowed(bias: PositionBias, length: int) -> bool:
    """Whether sequences of `length` tokens run in query blocks: a window, and a length where the blocks'
    keys (block + 2 x window) are well short of L."""
    return bias.window > 0 and length >= 2 * (_window_block(bias.window) + 2 * bias.window)


def _windowed_sdpa(q, k, v, bias: PositionBias, scale: float) -> torch.Tensor:
    """[G, H, L, D] (k, v: Hkv heads) -> [G, H, L, D]: queries [a, b) against keys [a - w, b + w) with
    block_mask's terms. Exact: the keys left out are the ones the window masks to -inf (weight 0). The
    blocks depend on the sequence's length alone, never on the rest of the batch."""
    length, w = q.shape[2], bias.window
    bq = _window_block(w)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    masks: dict[tuple[int, int, int], torch.Tensor] = {}       # interior blocks share one mask
    for a in range(0, length, bq):
        b = min(length, a + bq)
        ka, kb = max(0, a - w), min(length, b + w)
        key = (b - a, ka - a, kb - ka)
        mask = masks.get(key)
        if mask is None:
            mask = masks[key] = block_mask(bias, a, b, ka, kb, device=q.device)          # [1, H|1, Bq, Bk]
        out[:, :, a:b] = _sdpa(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], mask, scale, False)
    return out


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    """SDPA on [G, H, L, D] (k, v: [G, Hkv, L, D]); a causal mask without a mask tensor is SDPA's
    is_causal (a mask tensor, when there is one, already holds it: `position_mask`)."""
    kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal and mask is None,
                                          **kw)


def _needs_mask(bias: PositionBias, length: int) -> bool:
    """False where a window alone covers the whole sequence (ModernBERT's short sequences), or where the
    only term is the causal mask (SDPA's is_causal): SDPA then runs without a mask tensor, as fast as
    without a bias, and a batch of only such sequences builds no mask."""
    return bias.table is not None or (bias.window > 0 and length > bias.window + 1)


def _group_mask(big: torch.Tensor | None, bias: PositionBias | None, length: int) -> torch.Tensor | None:
    """The mask for sequences of `length` tokens: the [..., :L, :L] corner of the cached `big`."""
    return big[..., :length, :length] if big is not None and _needs_mask(bias, length) else None


def _prefix_keys_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, scale: float,
                      bias: PositionBias | None = None) -> torch.Tensor:
    """Attention where each sequence's tokens see only its first key_lens[i] tokens (meta.key_lens), on any
    device: sequences of equal (length, visible keys) share one SDPA call, q [G, H, L, D] against k, v
    [G, Hkv, K, D]. A PositionBias is the [..., :L, :K] corner of its mask (causal included), since the
    keys are the sequence's first positions."""
    t, h, d = q.shape
    bias = _check_bias(bias, q)
    by_shape: dict[tuple[int, int], list[int]] = {}
    start = 0
    for n, kl in zip(meta.seqlens, meta.key_lens):
        if n:
            by_shape.setdefault((n, kl), []).append(start)
        start += n
    big = None
    if bias is not None and by_shape:
        big = meta.masks_for(bias, max(n for n, _ in by_shape), q.dtype, q.device)        # [1, H|1, Lmax, Lmax]
    out = torch.empty_like(q)
    for (n, kl), starts in sorted(by_shape.items()):
        g = len(starts)
        first = torch.tensor(starts, device=q.device)[:, None]
        qi = (first + torch.arange(n, device=q.device)[None, :]).flatten()              # [G*L]
        ki = (first + torch.arange(kl, device=q.device)[None, :]).flatten()             # [G*K]
        qs = q.index_select(0, qi).view(g, n, h, d).transpose(1, 2)                      # [G, H, L, D]
        ks, vs = (x.index_select(0, ki).view(g, kl, x.shape[1], d).transpose(1, 2) for x in (k, v))  # [G, Hkv, K, D]
        mask = None if big is None else big[..., :n, :kl]
        o = _sdpa(qs, ks, vs, mask, scale, False)                                        # [G, H, L, D]
        out.index_copy_(0, qi, o.transpose(1, 2).reshape(g * n, h, d))
    return out


def check_no_key_lens(meta: AttentionMeta) -> None:
    """Attention kernels without visible-key prefixes (DeBERTa's disentangled attention) call this first."""
    if meta.key_lens is not None:
        raise ValueError("this attention (DeBERTa's disentangled attention) does not support key_lens (ColBERT "
                         "query expansion with attend=False)")


def _cuda_nested_sdpa(q, k, v, meta: AttentionMeta, scale: float) -> torch.Tensor:
    offsets = meta.cu_seqlens.to(torch.int64)
    nt = [torch.nested.nested_tensor_from_jagged(t, offsets=offsets, max_seqlen=meta.max_seqlen).transpose(1, 2)
          for t in (q, k, v)]                                                              # [B, H, j, D]
    o = F.scaled_dot_product_attention(*nt, scale=scale)
    return o.transpose(1, 2).values()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                     scale: float | None = None, bias: PositionBias | None = None) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, Hkv, D] packed (Hkv divides H: grouped-query attention); returns [T, H, D].
    Tokens attend within their own sequence only, with `bias` (if any) added to the scaled scores:
    softmax(q k^T * scale + bias) v."""
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = _check_bias(bias, q)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if meta.key_lens is not None:                     # visible-key prefixes (ColBERT query expansion)
        return _prefix_keys_sdpa(q, k, v, meta, scale, bias)
    if q.device.type == "cpu":
        return _cpu_grouped_sdpa(q, k, v, meta, scale, bias)
    if bias is not None:
        if q.device.type == "cuda":
            # torch's varlen and nested-tensor kernels take no bias: our Triton kernel adds it in its
            # tiles and skips the key blocks outside a window (any dtype, any head size)
            from .flash_varlen import flash_varlen
            return flash_varlen(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale=scale,
                                bias_table=bias.table, window=bias.window, causal=bias.causal)
        return _cpu_grouped_sdpa_any_device(q, k, v, meta, scale, bias)
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and k.shape[1] != q.shape[1]:
        from .flash_varlen import flash_varlen       # grouped kv heads, read in place by our kernel
        return flash_varlen(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale=scale)
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


def _cpu_grouped_sdpa_any_device(q, k, v, meta: AttentionMeta, scale: float,
                                 bias: PositionBias | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    big = None
    causal = bias is not None and bias.causal
    lmax = max(meta.seqlens, default=0)
    if bias is not None and lmax and _needs_mask(bias, lmax):
        # in q's dtype: other devices' SDPA kernels may want the mask in the inputs' dtype
        big = meta.masks_for(bias, lmax, q.dtype, q.device)
    start = 0
    for n in meta.seqlens:
        if n:
            qs, ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = _sdpa(qs, ks, vs, _group_mask(big, bias, n), scale, causal)
            out[start:start + n] = o[0].transpose(0, 1)                                       # [L, H, D]
        start += n
    return out
