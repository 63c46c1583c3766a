"""DeBERTa-v2/v3 disentangled attention on packed sequences.

Besides the content term q_i . k_j, a query attends to the relative position of the key (c2p) and a key
to the relative position of the query (p2c), through a table of 2k learned relative embeddings shared by
all layers and projected by each layer's own query and key weights (share_att_key):

    score(i, j) = (q_i . k_j  +  q_i . pk[r(i, j)]  +  k_j . pq[r(i, j)]) / sqrt(d * (1 + #terms))
    r(i, j)     = clamp(bucket(i - j) + k, 0, 2k - 1)          pk, pq: [nh, 2k, d]

`bucket` keeps distances exact below position_buckets / 2 and log-spaces them up to
max_relative_positions (transformers' make_log_bucket_position); k = position_buckets (or
max_relative_positions without buckets). r depends only on i - j, so every sequence of one length shares
one [L, L] index.

- `disentangled_attention_ref`: readable, fp32, one sequence at a time, the c2p / p2c terms over the
  whole table followed by gathers, as transformers' DisentangledSelfAttention computes them.
- `disentangled_attention`: sequences of equal length in one group: the group's c2p / p2c terms are two
  batched matmuls against the table rows its lengths can reach, gathered once with the length's index,
  then passed to SDPA as its additive mask (softmax accumulates in fp32). Never padded; any device.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionMeta, group_by_length

POS_ATT_TYPES = ("c2p", "p2c")
REL_NORMS = ("layer_norm", "none")


@dataclass(frozen=True)
class DisentangledConfig:
    """What a DeBERTa-v2/v3 layer adds to its attention scores (EncoderConfig.disentangled)."""

    position_buckets: int = 256            # <= 0: no log buckets (distances clipped at +-max_relative_positions)
    max_relative_positions: int = 512
    pos_att_type: tuple[str, ...] = ("c2p", "p2c")
    share_att_key: bool = True             # the relative embeddings go through the layer's own q / k projections
    norm_rel_ebd: str = "layer_norm"       # "layer_norm": the table has its own LayerNorm; "none"

    def __post_init__(self) -> None:
        types = tuple(sorted(set(self.pos_att_type)))
        bad = [t for t in types if t not in POS_ATT_TYPES]
        if bad:
            raise ValueError(f"pos_att_type {bad} is not supported; supported: {', '.join(POS_ATT_TYPES)}")
        object.__setattr__(self, "pos_att_type", types)
        if not self.share_att_key:
            raise ValueError("share_att_key=False (separate pos_key_proj / pos_query_proj per layer) is not "
                             "supported; DeBERTa-v2 and v3 checkpoints share the attention keys")
        if self.norm_rel_ebd not in REL_NORMS:
            raise ValueError(f"norm_rel_ebd {self.norm_rel_ebd!r} is not one of {REL_NORMS}")
        if self.max_relative_positions < 1:
            raise ValueError(f"max_relative_positions must be >= 1, got {self.max_relative_positions}")
        if 0 < self.position_buckets < 4:
            raise ValueError(f"position_buckets must be >= 4 (or <= 0: none), got {self.position_buckets}")

    @property
    def span(self) -> int:
        """k: the table holds 2k relative embeddings, for bucketed distances -k .. k - 1."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def scale(self) -> float:
        """The score scale relative to 1/sqrt(d): one more term per position term."""
        return 1.0 / math.sqrt(1 + len(self.pos_att_type))


def log_bucket(rel: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """transformers' make_log_bucket_position, op for op (so that rounding at bucket edges agrees):
    |rel| <= bucket_size / 2 stays, larger distances map log-spaced onto bucket_size / 2 .. bucket_size - 1
    (and beyond, past max_position)."""
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.tensor(mid - 1).type_as(rel), torch.abs(rel))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign).long()


def bucketed(rel: torch.Tensor, cfg: DisentangledConfig) -> torch.Tensor:
    """Query minus key position (int64) -> bucketed relative position, as transformers' build_relative_position."""
    if cfg.position_buckets > 0:
        return log_bucket(rel, cfg.position_buckets, cfg.max_relative_positions)
    return rel


_INDEX: dict[tuple, torch.Tensor] = {}
_INDEX_LOCK = threading.Lock()


def distance_index(cfg: DisentangledConfig, length: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.long) -> torch.Tensor:
    """[2n - 1] with n >= length: r for the distance i - j = -(n - 1) .. n - 1 (entry i - j + n - 1).
    Cached per config, device and dtype (int64 for torch's gathers, int32 for the kernel's loads), grown
    on demand: r for a length is the middle of a longer one's."""
    key = (cfg, str(device), dtype)
    hit = _INDEX.get(key)
    if hit is None or hit.shape[0] < 2 * length - 1:
        n = max(length, 512)
        rel = torch.arange(-(n - 1), n, dtype=torch.long)
        r = (bucketed(rel, cfg) + cfg.span).clamp_(0, 2 * cfg.span - 1)
        with _INDEX_LOCK:
            hit = _INDEX[key] = r.to(device=device, dtype=dtype)
    return hit


def position_projections(rel_embeddings: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                         num_heads: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's query and key projections of the relative embeddings [2k, H] (in fp32, then `dtype`):
    (pq, pk), each [nh, 2k, d]. They depend on weights only: fast paths compute them once at load."""
    h = rel_embeddings.shape[1]
    w = qkv_weight.detach().float()
    b = None if qkv_bias is None else qkv_bias.detach().float()
    rel = rel_embeddings.detach().float()
    out = []
    for part in (0, 1):                                   # qkv rows are [q; k; v]
        p = F.linear(rel, w[part * h:(part + 1) * h], None if b is None else b[part * h:(part + 1) * h])
        out.append(p.view(rel.shape[0], num_heads, -1).transpose(0, 1).to(dtype or rel_embeddings.dtype).contiguous())
    return out[0], out[1]


def disentangled_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               pos_q: torch.Tensor, pos_k: torch.Tensor, cfg: DisentangledConfig) -> torch.Tensor:
    """q, k, v [T, nh, d] packed; pos_q, pos_k [nh, 2k, d] -> [T, nh, d]. One sequence at a time in fp32,
    as transformers: the c2p / p2c scores against every table row, then gathered at r(i, j)."""
    d, span = q.shape[-1], cfg.span
    scale = math.sqrt(d * (1 + len(cfg.pos_att_type)))
    pq, pk = pos_q.float(), pos_k.float()
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        n = e - s
        if n == 0:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))          # [nh, n, d]
        pos = torch.arange(n, device=q.device)
        rel = bucketed(pos[:, None] - pos[None, :], cfg)                          # [n, n] query minus key
        scores = qs @ ks.transpose(-1, -2) / scale                                # [nh, n, n]
        if "c2p" in cfg.pos_att_type:
            c2p = qs @ pk.transpose(-1, -2)                                       # [nh, n(i), 2k]
            idx = (rel + span).clamp(0, 2 * span - 1)
            scores = scores + c2p.gather(-1, idx.expand(qs.shape[0], n, n)) / scale
        if "p2c" in cfg.pos_att_type:
            p2c = ks @ pq.transpose(-1, -2)                                       # [nh, n(j), 2k]
            idx = (-rel + span).clamp(0, 2 * span - 1)
            scores = scores + p2c.gather(-1, idx.expand(qs.shape[0], n, n)).transpose(-1, -2) / scale
        p = torch.softmax(scores, dim=-1)                                         # [nh, n, n]
        out[s:e] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


# Elements of one group chunk's [G, nh, L, max(L, W)] score tensors: bounds the memory of long groups.
MAX_CHUNK_ELEMENTS = 1 << 25


def disentangled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                           pos_q: torch.Tensor, pos_k: torch.Tensor, cfg: DisentangledConfig) -> torch.Tensor:
    """q, k, v [T, nh, d] packed (views into a fused QKV output are fine); pos_q, pos_k [nh, 2k, d] in
    q's dtype -> [T, nh, d]. Sequences of one length form one group; for each group

        bias = gather(q pk[lo:hi]^T, r - lo) + gather(k pq[lo:hi]^T, r^T - lo)^T       [G, nh, L, L]
        out  = SDPA(q, k, v, attn_mask=bias * s, scale=s)

    where lo..hi are the table rows that distances within L reach (at most 2L - 1 of them). Each
    sequence's arithmetic is the same alone or in any batch. Needs the host-side lengths (meta.seqlens)."""
    t, nh, d = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    if sum(meta.seqlens) != t:
        raise ValueError(f"disentangled attention needs the host-side lengths of the batch ({t} tokens), got "
                         f"seqlens summing to {sum(meta.seqlens)} (it cannot run under CUDA-graph capture)")
    groups = meta.groups if meta.groups is not None else group_by_length(meta.seqlens)
    lmax = groups[-1][0]
    host = distance_index(cfg, lmax)                                              # [2n - 1] on the host
    dev = host if q.device.type == "cpu" else distance_index(cfg, lmax, q.device)
    center = (host.shape[0] - 1) // 2
    dev_center = (dev.shape[0] - 1) // 2        # the device copy may have been grown to another length
    scale = cfg.scale / math.sqrt(d)
    c2p, p2c = "c2p" in cfg.pos_att_type, "p2c" in cfg.pos_att_type
    # CUDA's fused SDPA kernels take a mask in the inputs' dtype; on CPU an fp32 mask keeps the bias exact
    mask_dtype = q.dtype if q.device.type != "cpu" else torch.float32
    for length, starts in groups:
        lo, hi = int(host[center - length + 1]), int(host[center + length - 1])  # rows reached by |i - j| < L
        pos = torch.arange(length, device=q.device)
        idx = dev[pos[:, None] - pos[None, :] + dev_center] - lo                  # [L, L] r(i, j) - lo
        pk, pq = pos_k[:, lo:hi + 1], pos_q[:, lo:hi + 1]                         # [nh, W, d]
        per_seq = nh * length * max(length, hi - lo + 1)
        chunk = max(1, MAX_CHUNK_ELEMENTS // per_seq)
        for c0 in range(0, len(starts), chunk):
            part = starts[c0:c0 + chunk]
            g, s = len(part), part[0]
            adjacent = part[-1] - s == (g - 1) * length       # ascending starts: back to back
            if adjacent:
                rows = None
                qs, ks, vs = (x[s:s + g * length].view(g, length, nh, d).transpose(1, 2) for x in (q, k, v))
            else:
                rows = (torch.tensor(part, device=q.device)[:, None] + pos[None, :]).flatten()  # [G*L]
                qs, ks, vs = (x.index_select(0, rows).view(g, length, nh, d).transpose(1, 2) for x in (q, k, v))
            bias = None                                                           # [G, nh, L, L] fp32
            if c2p:
                sc = torch.matmul(qs, pk.transpose(-1, -2))                       # [G, nh, L(i), W]
                bias = sc.gather(-1, idx.expand(g, nh, length, length)).float()
            if p2c:
                sc = torch.matmul(ks, pq.transpose(-1, -2))                       # [G, nh, L(j), W]
                term = sc.gather(-1, idx.t().expand(g, nh, length, length)).transpose(-1, -2).float()
                bias = term if bias is None else bias.add_(term)
            mask = None if bias is None else bias.mul_(scale).to(mask_dtype)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)   # [G, nh, L, d]
            if rows is None:
                out[s:s + g * length].view(g, length, nh, d).copy_(o.transpose(1, 2))
            else:
                out.index_copy_(0, rows, o.transpose(1, 2).reshape(g * length, nh, d))
    return out


__all__ = ["DisentangledConfig", "log_bucket", "bucketed", "distance_index", "position_projections",
           "disentangled_attention_ref", "disentangled_attention"]
