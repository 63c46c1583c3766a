"""DeBERTa's disentangled attention as one flash-style Triton kernel on packed sequences.

    score(i, j) = (q_i . k_j + c2p[i, r(i, j)] + p2c[j, r(i, j)]) * scale       (ops/disentangled.py)

The position terms are split in two steps, so nothing of size [L, L] is ever built:
- batched GEMMs (one, where q/k and pk/pq are neighbours in memory) give every token's dot products
  with the table rows a batch can reach: c2p = q pk[lo:hi]^T and p2c = k pq[lo:hi]^T, each [nh, T, W]
  (cuBLAS), W those rows rounded up to a multiple of 8 (`aligned_rows`) so that cuBLAS runs its aligned
  kernels;
- the kernel runs the online softmax of flash attention per (head, query block) and, per key block, adds
  c2p[i, r - lo] + p2c[j, r - lo], with r read from the distance index (`distance_index`, [2n - 1]), or
  taken as i - j + k where every distance of the block pair is below the log buckets (so the compiler
  sees p2c's addresses run with the query, and reads them coalesced). Both terms index the table with
  the same r(i, j) = clamp(bucket(i - j) + k): the bucketing is odd in i - j, so transformers' p2c index
  of the transposed pair equals the c2p one.

Why a kernel of its own next to `flash_varlen`: its inputs are two per-token tables read by a per-pair
gather, where flash_varlen's bias is a per-head table indexed by j - i; keeping them apart leaves
flash_varlen's hot loop untouched. Computing the terms per block pair inside the kernel instead (q and k
against the BM + BN table rows a tile's distances reach, then a register gather) needs no [nh, T, W]
tables, but measured 1.3x (serve_b32) and 1.9x (offline_b256) slower on an H200 (tl.gather). The
readable reference is `disentangled.disentangled_attention_ref`.

Query blocks come from `flash_varlen.tile_table` (host lengths known) or, under CUDA-graph capture, a
dense (slots x heads, max_seqlen / BLOCK_M) grid whose programs past their sequence's end return at once.
"""
from __future__ import annotations

import math

import torch

from ._triton import check, kernel_ok, next_pow2, tl, triton
from .disentangled import DisentangledConfig, distance_index
from .flash_varlen import LOG2E, FlashConfig


def reachable_rows(cfg: DisentangledConfig, max_seqlen: int) -> tuple[int, int]:
    """(lo, hi): the table rows that distances |i - j| < max_seqlen reach (r is monotone in i - j)."""
    host = distance_index(cfg, max_seqlen)
    c = (host.shape[0] - 1) // 2
    return int(host[c - max_seqlen + 1]), int(host[c + max_seqlen - 1])


def aligned_rows(cfg: DisentangledConfig, max_seqlen: int, align: int = 8) -> tuple[int, int]:
    """`reachable_rows` widened to a multiple of `align` rows inside the table, so that the [nh, T, W]
    tables' rows start 16-byte aligned: with an odd W, cuBLAS fell back to an unaligned sm75 kernel that
    took 12 of deberta-v3-base's 36 ms on offline_b256 (H200, NOTES-gpu.md)."""
    lo, hi = reachable_rows(cfg, max_seqlen)
    rows = 2 * cfg.span
    width = min(-(-(hi - lo + 1) // align) * align, rows)
    lo = max(0, min(lo, rows - width))
    return lo, lo + width - 1


def _pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """[2, *a.shape]: a and b as one strided tensor, when b lies a fixed offset after a in one storage with
    a's strides (q and k of a fused QKV; the fast path's stacked position projections); else None."""
    if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype or a.device != b.device \
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    off = b.storage_offset() - a.storage_offset()
    return None if off <= 0 else torch.as_strided(a, (2, *a.shape), (off, *a.stride()), a.storage_offset())


def position_scores(q: torch.Tensor, k: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
                    cfg: DisentangledConfig, lo: int, hi: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """c2p = q . pk[lo:hi+1] and p2c = k . pq[lo:hi+1] per token and head: each [nh, T, W] in q's dtype
    (None for a term the config does not use). With both terms, and k after q and pq after pk in memory
    (`_pair`), one batched GEMM makes both: at serve sizes each GEMM is mostly its launch."""
    if len(cfg.pos_att_type) == 2:
        qk, pkq = _pair(q, k), _pair(pos_k, pos_q)
        if qk is not None and pkq is not None:
            both = torch.matmul(qk.transpose(1, 2), pkq[:, :, lo:hi + 1].transpose(-1, -2))   # [2, nh, T, W]
            return both[0], both[1]
    c2p = p2c = None
    if "c2p" in cfg.pos_att_type:
        c2p = torch.matmul(q.transpose(0, 1), pos_k[:, lo:hi + 1].transpose(-1, -2))          # [nh, T, W]
    if "p2c" in cfg.pos_att_type:
        p2c = torch.matmul(k.transpose(0, 1), pos_q[:, lo:hi + 1].transpose(-1, -2))          # [nh, T, W]
    return c2p, p2c


if triton is not None:
    @triton.jit
    def _position_terms(c2p_rows, p2c_base, DIDX, offs_m, qpos, rows, pair_ok, center, lo, stride_pt, span_lo,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_C2P: tl.constexpr,
                        HAS_P2C: tl.constexpr, EXACT: tl.constexpr):
        """c2p[i, r] + p2c[j, r] for the [BM, BN] pairs (i, j), r = r(i - j) - lo, in fp32; pairs outside
        pair_ok (a key or a query row past the sequence's end) read nothing. EXACT: every distance is
        unbucketed, r = i - j + span - lo (from offs_m itself, not the clamped qpos, so the compiler sees
        r run with the query); otherwise r comes from the distance index."""
        if EXACT:
            r = offs_m[:, None] - rows[None, :] + span_lo
        else:
            r = tl.load(DIDX + (qpos[:, None] - rows[None, :] + center), mask=pair_ok, other=lo) - lo
        pos = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_C2P:     # along a query's row of the table r runs with the key: neighbouring reads
            pos += tl.load(c2p_rows + r, mask=pair_ok, other=0.0).to(tl.float32)
        if HAS_P2C:     # a table row per key: coalesced along the query only where r is seen as i - j + c
            pos += tl.load(p2c_base + rows[None, :] * stride_pt + r, mask=pair_ok, other=0.0).to(tl.float32)
        return pos

    @triton.jit
    def _disentangled_kernel(Q, K, V, O, C2P, P2C, DIDX, CU, TILES, qk_scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_ot, stride_oh, stride_ch, stride_ct, stride_ph, stride_pt,
                             center, lo, H, NUM_MB, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TILES: tl.constexpr,
                             HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, SPAN: tl.constexpr,
                             MID: tl.constexpr):
        if USE_TILES:       # grid (heads, tiles), longest sequences first
            h = tl.program_id(0)
            b = tl.load(TILES + 2 * tl.program_id(1))
            mb = tl.load(TILES + 2 * tl.program_id(1) + 1)
        else:               # grid (slots * heads, NUM_MB): the last query blocks exist only for long sequences
            bh = tl.program_id(0)
            mb = NUM_MB - 1 - tl.program_id(1)
            b = bh // H
            h = bh % H
        start = tl.load(CU + b)
        seqlen = tl.load(CU + b + 1) - start
        m0 = mb * BLOCK_M
        if m0 >= seqlen:
            return
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < D
        row0 = start.to(tl.int64)
        q = tl.load(Q + (row0 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=(offs_m[:, None] < seqlen) & d_ok[None, :], other=0.0)              # [BM, HD]
        qpos = tl.minimum(offs_m, seqlen - 1)        # rows past the end point inside the tables (reads masked)
        c2p_rows = C2P + h * stride_ch + (row0 + qpos)[:, None] * stride_ct                   # [BM, 1]
        p2c_base = P2C + h * stride_ph + row0 * stride_pt
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            rows = n0 + offs_n                                                                  # [BN] keys j
            ok = rows < seqlen
            kv_mask = ok[:, None] & d_ok[None, :]
            k = tl.load(K + (row0 + rows[:, None]) * stride_kt + h * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)                                                # [BN, HD]
            pair_ok = ok[None, :] & (offs_m[:, None] < seqlen)     # rows past the end read nothing
            # a block pair whose distances all lie where buckets are exact (|i - j| <= MID) takes r as
            # arithmetic, so the compiler sees p2c's addresses run with the query and coalesces them
            if (m0 + BLOCK_M - 1 - n0 <= MID) & (n0 + BLOCK_N - 1 - m0 <= MID):
                pos = _position_terms(c2p_rows, p2c_base, DIDX, offs_m, qpos, rows, pair_ok, center, lo, stride_pt,
                                      SPAN - lo, BLOCK_M, BLOCK_N, HAS_C2P, HAS_P2C, EXACT=True)
            else:
                pos = _position_terms(c2p_rows, p2c_base, DIDX, offs_m, qpos, rows, pair_ok, center, lo, stride_pt,
                                      SPAN - lo, BLOCK_M, BLOCK_N, HAS_C2P, HAS_P2C, EXACT=False)
            s = tl.dot(q, tl.trans(k), pos)     # one layout change for both terms, as the dot's accumulator
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (row0 + rows[:, None]) * stride_vt + h * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)                                                # [BN, HD]
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + (row0 + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < seqlen) & d_ok[None, :])


def disentangled_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int, pos_q: torch.Tensor, pos_k: torch.Tensor, cfg: DisentangledConfig,
                       out: torch.Tensor | None = None, config: FlashConfig | None = None,
                       tiles: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [T, nh, d] packed (views of a fused QKV are fine); pos_q, pos_k [nh, 2k, d] in q's dtype
    -> [T, nh, d]. cu_seqlens [B+1] int32 on q's device; max_seqlen bounds every sequence's length.
    tiles: `tile_table(lengths, config.block_m)` on q's device; without it the dense grid runs (what a
    CUDA graph captures: nothing here reads the device back)."""
    check(q.dim() == 3 and q.shape == k.shape == v.shape,
          f"q, k, v must share one [T, nh, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    t, nh, d = q.shape
    check(q.dtype == k.dtype == v.dtype == pos_q.dtype == pos_k.dtype,
          f"q, k, v, pos_q, pos_k need one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {pos_q.dtype}, {pos_k.dtype}")
    check(pos_q.shape == pos_k.shape == (nh, 2 * cfg.span, d),
          f"pos_q, pos_k must be [nh={nh}, 2k={2 * cfg.span}, d={d}], got {tuple(pos_q.shape)}, {tuple(pos_k.shape)}")
    check(all(x.stride(2) == 1 for x in (q, k, v)), "q, k, v need a contiguous last (head) dimension")
    check(cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device,
          f"cu_seqlens must be a 1-D int32 tensor on {q.device}, got {cu_seqlens.dtype} on {cu_seqlens.device}")
    if out is None:
        out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    b = cu_seqlens.numel() - 1
    if t == 0 or b <= 0 or max_seqlen <= 0:
        return out
    if not kernel_ok(q, k, v, cu_seqlens):
        from .disentangled import disentangled_attention_ref
        return out.copy_(disentangled_attention_ref(q, k, v, cu_seqlens, pos_q, pos_k, cfg))
    lo, hi = aligned_rows(cfg, max_seqlen)
    c2p, p2c = position_scores(q, k, pos_q, pos_k, cfg, lo, hi)                                # [nh, T, W]
    didx = distance_index(cfg, max_seqlen, q.device, torch.int32)                              # [2n - 1]
    cfg_k = config or FlashConfig(64, 16, 4, 3)
    if tiles is not None:
        check(tiles.dim() == 2 and tiles.shape[1] == 2 and tiles.dtype == torch.int32 and tiles.device == q.device,
              "tiles must be tile_table(...) as an int32 [n, 2] tensor on q's device")
        if tiles.shape[0] == 0:
            return out
    use_tiles = tiles is not None and tiles.shape[0] <= 65535
    num_mb = triton.cdiv(max_seqlen, cfg_k.block_m)
    grid = (nh, tiles.shape[0]) if use_tiles else (b * nh, num_mb)
    first = c2p if c2p is not None else p2c
    c2p, p2c = (first if c2p is None else c2p), (first if p2c is None else p2c)   # unused pointers stay valid
    scale = cfg.scale / math.sqrt(d)
    _disentangled_kernel[grid](
        q, k, v, out, c2p, p2c, didx, cu_seqlens, tiles if use_tiles else cu_seqlens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        c2p.stride(0), c2p.stride(1), p2c.stride(0), p2c.stride(1), (didx.shape[0] - 1) // 2, lo, nh, num_mb,
        D=d, HEAD_DIM=max(16, next_pow2(d)), BLOCK_M=cfg_k.block_m, BLOCK_N=cfg_k.block_n, USE_TILES=use_tiles,
        HAS_C2P="c2p" in cfg.pos_att_type, HAS_P2C="p2c" in cfg.pos_att_type, SPAN=cfg.span,
        MID=cfg.position_buckets // 2 if cfg.position_buckets > 0 else cfg.span - 1,
        num_warps=cfg_k.num_warps, num_stages=cfg_k.num_stages)
    return out


__all__ = ["aligned_rows", "disentangled_flash", "position_scores", "reachable_rows"]
