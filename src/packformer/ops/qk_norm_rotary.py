"""Per-head q/k RMSNorm and rotary in one in-place pass over the QKV buffer (Qwen3, Gemma 3).

These families normalise every q and k head (RMSNorm over its head_dim, one weight per dim shared by
the heads) and then rotate it. Unfused that is a copy of each strided view, a norm writing new tensors
and a rotary pass: on an H200, Qwen3-0.6B's offline batch spent 18% of its time there. The kernel loads
a tile of rows of one head once, normalises and rotates it in fp32 registers and writes it back with a
single rounding.

- `qk_norm_rotary_ref`: plain torch in fp32 (the specification): `rms_norm_ref` then `apply_rotary_ref`'s
  math without the rounding in between.
- `_qk_norm_rotary_kernel`: Triton; one program per (row block, q head), which also takes k head h when
  h < the number of kv heads (GQA: fewer k heads), so the cos/sin rows are loaded once for both.
- `qk_norm_rotary_`: the in-place launcher. The kernel covers rotaries over the whole head (both pair
  layouts); a partial rotary takes the reference math, written back in place.
"""
from __future__ import annotations

import torch

from ._triton import check, kernel_ok, next_pow2, tl, triton
from .rmsnorm import rms_norm_ref
from .rotary import RotaryConfig, _check_args, _pair_views


def qk_norm_rotary_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       cfg: RotaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) [T, H, D]: each head RMS-normed over D with its weight [D], then rotated by the per-row
    angles of cos/sin [T, dim/2]; new tensors in q's dtype, computed in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    rot = cfg.rot_dim(q.shape[-1])
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]                    # [T, 1, dim/2]
    outs = []
    for x, w in ((q, q_weight), (k, k_weight)):
        y = rms_norm_ref(x.to(acc), w, eps)                                     # [T, H, D]
        x1, x2 = _pair_views(y, rot, cfg.interleaved)
        r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
        z = y.clone()
        z1, z2 = _pair_views(z, rot, cfg.interleaved)
        z1.copy_(r1)
        z2.copy_(r2)
        outs.append(z.to(x.dtype))
    return outs[0], outs[1]


if triton is not None:
    from .rotary import pair_columns

    @triton.jit
    def _norm_rotate_tile(X, W, r64, stride_t, p1, p2, c, s, mask, eps, D: tl.constexpr):
        """RMS-normalise and rotate one [ROWS, PAIRS] tile of one head of X in place (fp32 math)."""
        base = X + r64[:, None] * stride_t
        x1 = tl.load(base + p1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + p2[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)     # [ROWS]
        x1 = x1 * rstd[:, None] * tl.load(W + p1).to(tl.float32)[None, :]
        x2 = x2 * rstd[:, None] * tl.load(W + p2).to(tl.float32)[None, :]
        tl.store(base + p1[None, :], (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
        tl.store(base + p2[None, :], (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rotary_kernel(Q, K, QW, KW, COS, SIN, T, HK, stride_qt, stride_qh, stride_kt, stride_kh, eps,
                               HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)             # [BT]
        h = tl.program_id(1)
        pairs = tl.arange(0, HALF)                                             # HALF: a power of two
        r64 = rows.to(tl.int64)
        mask = (rows < T)[:, None]
        cs_off = r64[:, None] * HALF + pairs[None, :]                          # contiguous [T, HALF] tables
        c = tl.load(COS + cs_off, mask=mask, other=0.0).to(tl.float32)         # [BT, HALF]
        s = tl.load(SIN + cs_off, mask=mask, other=0.0).to(tl.float32)
        p1, p2 = pair_columns(pairs, HALF, INTERLEAVED)
        _norm_rotate_tile(Q + h * stride_qh, QW, r64, stride_qt, p1, p2, c, s, mask, eps, 2 * HALF)
        if h < HK:
            _norm_rotate_tile(K + h * stride_kh, KW, r64, stride_kt, p1, p2, c, s, mask, eps, 2 * HALF)


TILE = 2048     # elements per [ROWS, PAIRS] tile (each of a head's two pair members)


def qk_norm_rotary_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, cfg: RotaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and rotate q [T, Hq, D] and k [T, Hk, D] (Hk <= Hq; rows may be strided views of one QKV
    buffer) in place; returns (q, k). cos, sin: contiguous [T, dim/2] tables (`rotary_tables`)."""
    rot = _check_args(q, k, cos, sin, cfg, (torch.float16, torch.bfloat16, torch.float32))
    t, hq, d = q.shape
    hk = k.shape[1]
    check(hk <= hq, f"k has more heads ({hk}) than q ({hq})")
    check(q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last (head) dimension")
    check(cos.is_contiguous() and sin.is_contiguous(), "cos and sin must be contiguous tables")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check(w.shape == (d,) and w.is_contiguous() and w.device == q.device,
              f"{name} must be a contiguous [{d}] vector on {q.device}, got {tuple(w.shape)} on {w.device}")
    check(q.numel() == 0 or q.data_ptr() != k.data_ptr(), "q and k must be distinct tensors")
    half = rot // 2
    if rot != d or half != next_pow2(half) or not kernel_ok(q, k, q_weight, k_weight, cos, sin):
        q2, k2 = qk_norm_rotary_ref(q, k, q_weight, k_weight, eps, cos, sin, cfg)
        return q.copy_(q2), k.copy_(k2)
    if t == 0 or hq == 0:
        return q, k
    block_t = max(1, TILE // half)
    _qk_norm_rotary_kernel[(triton.cdiv(t, block_t), hq)](
        q, k, q_weight, k_weight, cos, sin, t, hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps,
        HALF=half, INTERLEAVED=cfg.interleaved, BLOCK_T=block_t, num_warps=4)
    return q, k
