"""Varlen flash attention in Triton: softmax(q k^T * scale) v per packed sequence, on [T, H, D] views.

Why our own kernel next to torch's `varlen_attn` (FlashAttention-2): FA2 as torch ships it is built for
sm80 (mma.sync, 128x128 tiles). Encoder batches are many short sequences (offline_b256: median 96
tokens), so a 128-row tile is mostly padding for a third of them, and on a Hopper GPU FA2 reached about
105 TFLOP/s on that batch (benchmarks/NOTES-gpu.md). Triton emits Hopper wgmma, and this kernel's tile
sizes are chosen per problem; the GPU benchmark decides which kernel the fast path uses.

- reference: `attention.varlen_attention_ref` (plain softmax in fp32, one sequence at a time).
- `_flash_varlen_kernel`: one program per (head, query block of a sequence); online softmax in fp32
  with exp2; the last key block is the only one masked. Optional position terms (`PositionBias` in
  attention.py), both constexpr-switched so the plain kernel compiles as before: a relative-position
  bias table[h, clamp(j - i, -R, R) + R] added to the scaled scores, read as one [BM, BN] tile per key
  block (`bias_tiles`: the bias depends on the block's offset from the query block only, so a handful of
  tiles per head serve every block, loaded like K and V instead of gathered element by element), and a
  local window |j - i| <= w whose
  key loop visits only the blocks the query block can see; and a causal mask j <= i (CAUSAL: the key
  loop stops at the query block's diagonal, so the blocks above it are never read). RoPE (ROTARY): q
  and k are turned as they are read, each head as its two pair halves, and the scores are two dots
  over the halves (every query block re-turns the keys it reads: the in-place pass in rotary.py is
  faster on sequences of several query blocks; benchmarks/NOTES-gpu.md). Grouped-query attention: k and
  v may have fewer heads (head h reads kv head h // GROUP), read in place. Three ways to enumerate the
  query blocks:
  - a tile table (`tile_table`, built on the host from the lengths, once per forward): exactly the
    blocks that exist, longest sequences first (their programs run longest, so the grid's tail is
    short ones);
  - without one (a CUDA graph: its replays see other lengths), a grid of (T / BLOCK_M + B) programs
    per head, each finding its (sequence, query block) from cu_seqlens in the kernel (a cumulative sum
    of blocks per sequence); the spare ones exit at once. Nothing is read back to the host;
  - or a dense (B x max_seqlen / BLOCK_M) grid whose programs past their sequence's end return at
    once (the previous graph grid: 8x more programs on serve batches, 2.4% more GPU time per replay).
- `flash_varlen`: the launcher (checks shapes, dtypes and strides).
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ._triton import check, kernel_ok, next_pow2, tl, triton
from .rotary import RotaryConfig, apply_rotary_, apply_rotary_ref

if triton is not None:
    from .rotary import pair_columns


SELF_INDEX_MAX_SEQS = 1024   # every program of the self-indexed grid reads all of cu_seqlens (about 4 KB at most)


@dataclass(frozen=True)
class FlashConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_config(head_dim: int, max_seqlen: int) -> FlashConfig:
    """Tiles chosen on an H200 by benchmarks/gpu_fastpath.py --sections attention,decoder_attention
    (NOTES-gpu.md): 64 query rows (128-row tiles lost 10-20% to padding on these short sequences) and 32
    keys per step. Head size 32 (MiniLM offline_b256): 88 vs 103 us with 64 keys; 64: the same offline
    (131 us), 10% faster on serve_b32 (12.5 vs 14.0 us); 128 (Qwen3-0.6B, causal, bf16): 233 vs 275 us
    offline, 33 vs 82 us on serve_b32. Heads over 128 dims (EmbeddingGemma: 256) take 2 stages so the K/V
    stages fit in shared memory; 64x32 was also the fastest of nine configs there offline (129 us)."""
    return FlashConfig(64, 32, 4, 3 if head_dim <= 128 else 2)


def tile_table(seqlens: list[int] | np.ndarray, block_m: int) -> np.ndarray:
    """[n, 2] int32 (sequence index, query block index) for every query block of every sequence,
    longest sequences first."""
    lens = np.asarray(seqlens, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    counts = ((lens + (block_m - 1)) // block_m)[order]                 # query blocks per sequence
    seq = np.repeat(order, counts)
    out = np.empty((seq.size, 2), dtype=np.int32)
    out[:, 0] = seq
    out[:, 1] = np.arange(seq.size) - np.repeat(np.cumsum(counts) - counts, counts)   # block within its sequence
    return out


def rotary_fused(cfg: RotaryConfig, head_dim: int) -> bool:
    """Whether the kernel turns q and k itself: RoPE on the whole head, whose halves (the pairs' first
    and second members) are power-of-two tiles the tensor cores take (>= 16 dims each). The scores are
    then two dots over the halves; partial rotaries are rotated by a separate pass first."""
    half = head_dim // 2
    return cfg.rot_dim(head_dim) == head_dim and half >= 16 and half & (half - 1) == 0


LOG2E = 1.4426950408889634   # the kernel's scores are in log2 units (exp2): qk * scale * log2(e)


_BIAS_TILES: dict = {}        # (id(table), block_m, block_n) -> (weakref to the table, its version, tiles, koff, n)


def bias_tiles(table: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, int, int]:
    """The relative-position bias as the kernel reads it: ([H, n * BM * BN] fp32, koff, n), where tile t
    of head h is table[h, clamp(d + c - r, -R, R) + R] * log2(e) at row r, column c, for the key-block
    offset d = n0 - m0 = (t - koff) * BN. Offsets beyond the first or last tile see a constant bias
    (every |j - i| >= R), the same as that tile's. Cached per table and tile shape (a forward's layers
    share one table); an in-place update of the table rebuilds it."""
    key = (id(table), block_m, block_n)
    version = 0 if table.is_inference() else table._version    # inference tensors have no version counter
    hit = _BIAS_TILES.get(key)
    if hit is not None and hit[0]() is table and hit[1] == version:
        return hit[2], hit[3], hit[4]
    r = (table.shape[1] - 1) // 2
    koff = -(-(r + block_n - 1) // block_n)               # offsets d <= -koff * BN: all j - i <= -R
    n = koff + -(-(r + block_m - 1) // block_n) + 1        # offsets d >= (n - 1 - koff) * BN: all j - i >= R
    dev = table.device
    d = (torch.arange(n, device=dev) - koff) * block_n                                   # [n]
    rel = (d[:, None, None] + torch.arange(block_n, device=dev)[None, None, :]
           - torch.arange(block_m, device=dev)[None, :, None])                          # [n, BM, BN]
    tiles = (table.detach()[:, rel.clamp(-r, r) + r] * LOG2E).reshape(table.shape[0], -1).contiguous()
    if len(_BIAS_TILES) >= 16:
        _BIAS_TILES.clear()
    _BIAS_TILES[key] = (weakref.ref(table), version, tiles, koff, n)
    return tiles, koff, n


if triton is not None:
    @triton.jit
    def _rotated_halves(x_row, COS, SIN, rows, cs_rows, ok, stride_t, pairs, HALF: tl.constexpr,
                        INTERLEAVED: tl.constexpr, MASKED: tl.constexpr):
        """Rows `rows` of one head (x_row: its row 0) turned by RoPE: the two members of every pair as
        [R, HALF] tiles (x1 cos - x2 sin, x2 cos + x1 sin), fp32 math rounded once to x's dtype, as
        rotary.apply_rotary_ writes them. cs_rows: the rows' packed indices into the [T, HALF] cos/sin."""
        p1, p2 = pair_columns(pairs, HALF, INTERLEAVED)
        base = x_row + rows[:, None] * stride_t
        cs = cs_rows[:, None] * HALF + pairs[None, :]
        if MASKED:
            x1 = tl.load(base + p1[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            x2 = tl.load(base + p2[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            c = tl.load(COS + cs, mask=ok[:, None], other=0.0)
            s = tl.load(SIN + cs, mask=ok[:, None], other=0.0)
        else:
            x1 = tl.load(base + p1[None, :]).to(tl.float32)
            x2 = tl.load(base + p2[None, :]).to(tl.float32)
            c = tl.load(COS + cs)
            s = tl.load(SIN + cs)
        dt = x_row.dtype.element_ty
        return (x1 * c - x2 * s).to(dt), (x2 * c + x1 * s).to(dt)

    @triton.jit
    def _attend_block(q, q2, k_base, v_base, rows, seqlen, d_ok, m_i, l_i, acc, qk_scale, stride_kt, stride_vt,
                      qpos, n0, m0, bias_head, koff, num_bt, window, k_row, COS, SIN, row0, pairs,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, BIAS: tl.constexpr,
                      WINDOW: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, HALF: tl.constexpr,
                      INTERLEAVED: tl.constexpr):
        """One online-softmax step over the key rows `rows` = n0 + [0, BN): returns the updated (max, sum,
        acc). MASKED: the block runs past the sequence's end (only its last block does).
        BIAS: add the head's bias tile for key offset n0 - m0 (`bias_tiles`; koff: the tile of offset 0,
        num_bt: tiles per head) to the scores.
        WINDOW: only keys with |j - i| <= window count (qpos [BM]: the query positions i).
        CAUSAL: only keys with j <= i count.
        ROTARY: q, q2 are the rotated pair members of the queries [BM, HALF]; the keys are turned here as
        they are read (k_row: the head's row 0; COS/SIN rows from row0 + rows), and the scores are the
        sum of the two halves' dots."""
        ok = rows < seqlen
        kv_mask = (ok[:, None] & d_ok[None, :]) if MASKED else d_ok[None, :]
        if ROTARY:
            k1, k2 = _rotated_halves(k_row, COS, SIN, rows, row0 + rows, ok, stride_kt, pairs, HALF, INTERLEAVED,
                                     MASKED)                                                      # [BN, HALF] x2
            s = tl.dot(q2, tl.trans(k2), tl.dot(q, tl.trans(k1))) * qk_scale                      # [BM, BN]
        else:
            k = tl.load(k_base + rows[:, None] * stride_kt, mask=kv_mask, other=0.0)             # [BN, HD]
            s = tl.dot(q, tl.trans(k)) * qk_scale                                                 # [BM, BN]
        if BIAS:   # softmax(q k^T * scale + bias); the tiles hold bias * log2(e), the scores' units
            t = tl.minimum(tl.maximum((n0 - m0) // BLOCK_N + koff, 0), num_bt - 1)
            tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]     # [BM, BN]
            s += tl.load(bias_head + t * (BLOCK_M * BLOCK_N) + tile)
        if WINDOW or CAUSAL:
            rel = rows[None, :] - qpos[:, None]                        # [BM, BN] key minus query position
            if WINDOW and CAUSAL:
                seen = (rel <= 0) & (rel >= -window)
            elif WINDOW:
                seen = (rel <= window) & (rel >= -window)
            else:
                seen = rel <= 0
            if MASKED:
                seen = seen & ok[None, :]
            s = tl.where(seen, s, float("-inf"))
        elif MASKED:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if WINDOW or CAUSAL:   # a row may see no key of this block yet: keep exp2(-inf - -inf) from making NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vt, mask=kv_mask, other=0.0)                  # [BN, HD]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.jit
    def _flash_varlen_kernel(Q, K, V, O, CU, TILES, BIAS_TILES, COS, SIN, qk_scale, stride_qt, stride_qh,
                             stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bh, koff,
                             num_bt, window,
                             H, NUM_MB, NSEG, GROUP, D: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             USE_TILES: tl.constexpr, SELF_INDEX: tl.constexpr, SEG_POW2: tl.constexpr,
                             BIAS: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
                             ROTARY: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        if USE_TILES:     # grid (heads, tiles): the table lists the blocks longest sequence first
            h = tl.program_id(0)
            b = tl.load(TILES + 2 * tl.program_id(1))
            mb = tl.load(TILES + 2 * tl.program_id(1) + 1)
        elif SELF_INDEX:  # grid (heads, T / BLOCK_M + B): program i takes the i-th query block of all
            h = tl.program_id(0)          # sequences in order, found from cu_seqlens
            i = tl.program_id(1)
            offs_s = tl.arange(0, SEG_POW2)
            s_ok = offs_s < NSEG
            lo = tl.load(CU + offs_s, mask=s_ok, other=0)
            hi = tl.load(CU + offs_s + 1, mask=s_ok, other=0)
            nblk = (hi - lo + BLOCK_M - 1) // BLOCK_M                  # query blocks per sequence
            ends = tl.cumsum(nblk, 0)                                  # blocks up to each sequence's end
            b = tl.sum((ends <= i).to(tl.int32), 0)                    # sequences wholly before block i
            if b >= NSEG:                                              # a spare program
                return
            mb = i - tl.sum(tl.where(offs_s == b, ends - nblk, 0), 0)
        else:             # grid (slots * heads, NUM_MB), query blocks in reverse: the last blocks exist
            bh = tl.program_id(0)     # only for the longest sequences, so those start first
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
        hk = h // GROUP                                                # the kv head of query head h
        k_row = K + row0 * stride_kt + hk * stride_kh                  # the kv head's row 0 of this sequence
        k_base = k_row + offs_d[None, :]
        pairs = tl.arange(0, HALF)
        if ROTARY:     # the queries turned once, as pair members [BM, HALF] each (no separate rotary pass)
            q, q2 = _rotated_halves(Q + row0 * stride_qt + h * stride_qh, COS, SIN, offs_m, row0 + offs_m,
                                    offs_m < seqlen, stride_qt, pairs, HALF, INTERLEAVED, MASKED=True)
        else:
            q_ptrs = Q + (row0 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :]
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen) & d_ok[None, :], other=0.0)   # [BM, HD]
            q2 = q
        v_base = V + row0 * stride_vt + hk * stride_vh + offs_d[None, :]
        # query positions; rows past the end take the last row's, so under a window they still see a key
        qpos = tl.minimum(offs_m, seqlen - 1)
        bias_head = BIAS_TILES + h * stride_bh                         # the head's tiles [num_bt, BM, BN]
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        if WINDOW:
            # only the key blocks that meet [m0 - window, m0 + BLOCK_M - 1 + window]: the window's saving
            n_lo = (tl.maximum(m0 - window, 0) // BLOCK_N) * BLOCK_N
            n_hi = tl.minimum(m0 + BLOCK_M + window, seqlen)           # one past the last key seen
            n_mid = tl.minimum(n_hi, full_end)
        else:
            n_lo = 0
            n_hi = seqlen
            n_mid = full_end
        if CAUSAL:      # no key past the block's last query: the blocks above the diagonal are skipped
            n_hi = tl.minimum(n_hi, m0 + BLOCK_M)
            n_mid = tl.minimum(n_hi, full_end)
        for n0 in range(n_lo, n_mid, BLOCK_N):            # key blocks fully inside the sequence: no end mask
            m_i, l_i, acc = _attend_block(q, q2, k_base, v_base, n0 + offs_n, seqlen, d_ok, m_i, l_i, acc,
                                          qk_scale, stride_kt, stride_vt, qpos, n0, m0, bias_head, koff, num_bt,
                                          window, k_row, COS, SIN, row0, pairs, BLOCK_M, BLOCK_N, MASKED=False,
                                          BIAS=BIAS, WINDOW=WINDOW, CAUSAL=CAUSAL, ROTARY=ROTARY, HALF=HALF,
                                          INTERLEAVED=INTERLEAVED)
        if full_end < n_hi:                                # the ragged last key block
            m_i, l_i, acc = _attend_block(q, q2, k_base, v_base, full_end + offs_n, seqlen, d_ok, m_i, l_i, acc,
                                          qk_scale, stride_kt, stride_vt, qpos, full_end, m0, bias_head, koff,
                                          num_bt, window, k_row, COS, SIN, row0, pairs, BLOCK_M, BLOCK_N,
                                          MASKED=True, BIAS=BIAS, WINDOW=WINDOW, CAUSAL=CAUSAL, ROTARY=ROTARY,
                                          HALF=HALF, INTERLEAVED=INTERLEAVED)
        acc = acc / l_i[:, None]
        o_ptrs = O + (row0 + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < seqlen) & d_ok[None, :])


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 scale: float | None = None, out: torch.Tensor | None = None,
                 config: FlashConfig | None = None, tiles: torch.Tensor | None = None,
                 dense: bool = False, bias_table: torch.Tensor | None = None, window: int = 0,
                 causal: bool = False,
                 rotary: tuple[torch.Tensor, torch.Tensor, RotaryConfig] | None = None) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, Hkv, D] (rows may be strided, e.g. views of a fused QKV; Hkv divides H:
    grouped-query attention, q head h reads kv head h // (H / Hkv)) -> [T, H, D].
    cu_seqlens: [B+1] int32 on q's device; max_seqlen: an upper bound on every sequence's length.
    tiles: optional `tile_table(lengths, config.block_m)` on q's device (no spare programs, longest
    sequences first); without it the kernel finds each program's block from cu_seqlens (up to
    SELF_INDEX_MAX_SEQS sequences), or, with dense=True or more sequences, runs the dense grid.
    bias_table: optional [H, 2R+1] fp32 on q's device; score(i, j) = q_i k_j * scale + table[h, clamp(j - i,
    -R, R) + R] (positions inside the sequence). window > 0: query i sees key j only when |j - i| <= window.
    causal: query i sees key j only when j <= i.
    rotary: (cos, sin, cfg): q and k are turned by RoPE first (cos/sin: `rotary_tables`, [T, dim/2]); q and
    k themselves are left as they are. Where `rotary_fused(cfg, D)` the kernel turns them as it reads them
    (no separate pass, no rotated copy); otherwise rotated copies are made first."""
    check(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and k.shape[0] == q.shape[0]
          and k.shape[2] == q.shape[2] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
          f"q must be [T, H, D] and k, v one [T, Hkv, D] shape with H a multiple of Hkv, got {tuple(q.shape)}, "
          f"{tuple(k.shape)}, {tuple(v.shape)}")
    check(isinstance(causal, bool), f"causal must be a bool, got {causal!r}")
    check(q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"q, k, v need one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(all(x.stride(2) == 1 for x in (q, k, v)), "q, k, v need a contiguous last (head) dimension")
    check(cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device,
          f"cu_seqlens must be a 1-D int32 tensor on {q.device}, got {cu_seqlens.dtype} on {cu_seqlens.device}")
    t, h, d = q.shape
    check(isinstance(window, numbers.Integral) and not isinstance(window, bool) and window >= 0,
          f"window must be an int >= 0 (0: no window), got {window!r}")
    window = int(window)
    if bias_table is not None:
        bt = bias_table
        check(bt.dim() == 2 and bt.shape[0] == h and bt.shape[1] % 2 == 1 and bt.dtype == torch.float32
              and bt.device == q.device and bt.stride(1) == 1,
              f"bias_table must be a [H={h}, 2R+1] fp32 tensor on {q.device} with contiguous rows, "
              f"got {bt.dtype} {tuple(bt.shape)} on {bt.device}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if out is None:
        out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, f"out must be {tuple(q.shape)} {q.dtype}")
    fuse = False
    if rotary is not None:
        check(isinstance(rotary, tuple) and len(rotary) == 3 and isinstance(rotary[2], RotaryConfig)
              and all(isinstance(x, torch.Tensor) for x in rotary[:2]),
              f"rotary must be (cos, sin, RotaryConfig), got {type(rotary).__name__}")
        cos, sin, rcfg = rotary
        fuse = (rotary_fused(rcfg, d) and kernel_ok(q, k, v, cu_seqlens, cos, sin)
                and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                and cos.shape == sin.shape == (t, d // 2))
        if not fuse:       # rotated copies, then plain attention (the reference path, odd layouts)
            if kernel_ok(q, k, cos, sin):
                q, k = apply_rotary_(q.clone(), k.clone(), cos, sin, rcfg)
            else:
                q, k = apply_rotary_ref(q, k, cos, sin, rcfg)
    if not kernel_ok(q, k, v, cu_seqlens):
        from .attention import PositionBias, varlen_attention_ref
        bias = PositionBias(bias_table, window, causal) if bias_table is not None or window or causal else None
        return out.copy_(varlen_attention_ref(q, k, v, cu_seqlens, scale, bias))
    b = cu_seqlens.numel() - 1
    if t == 0 or b <= 0 or max_seqlen <= 0:
        return out
    cfg = config or default_config(d, max_seqlen)
    num_mb = triton.cdiv(max_seqlen, cfg.block_m)
    if tiles is not None:
        check(tiles.dim() == 2 and tiles.shape[1] == 2 and tiles.dtype == torch.int32 and tiles.device == q.device,
              "tiles must be tile_table(...) as an int32 [n, 2] tensor on q's device")
        if tiles.shape[0] == 0:
            return out
    use_tiles = tiles is not None and tiles.shape[0] <= 65535     # the grid's second axis limit
    self_index = not use_tiles and not dense and b <= SELF_INDEX_MAX_SEQS
    if use_tiles:
        grid = (h, tiles.shape[0])
    elif self_index:
        grid = (h, triton.cdiv(t, cfg.block_m) + b)   # each sequence has at most one partial block
    else:
        grid = (b * h, num_mb)
    has_bias = bias_table is not None
    if has_bias:
        check(cfg.block_m % cfg.block_n == 0, f"a bias table needs block_m a multiple of block_n, got {cfg}")
        bt, koff, num_bt = bias_tiles(bias_table, cfg.block_m, cfg.block_n)
    else:
        bt, koff, num_bt = cu_seqlens, 0, 0
    _flash_varlen_kernel[grid](
        q, k, v, out, cu_seqlens, tiles if use_tiles else cu_seqlens, bt,
        cos if fuse else cu_seqlens, sin if fuse else cu_seqlens, scale * LOG2E, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        bt.stride(0) if has_bias else 0, koff, num_bt, window, h, num_mb, b, h // k.shape[1], D=d,
        HEAD_DIM=max(16, next_pow2(d)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TILES=use_tiles,
        SELF_INDEX=self_index, SEG_POW2=next_pow2(b) if self_index else 1, BIAS=has_bias, WINDOW=window > 0,
        CAUSAL=causal, ROTARY=fuse, HALF=d // 2 if fuse else 16,
        INTERLEAVED=fuse and rotary[2].interleaved,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
