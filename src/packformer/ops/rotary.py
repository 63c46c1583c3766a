"""Rotary position embeddings (RoPE) on packed q, k [T, H, D], as ModernBERT, NomicBERT, GTE ("new"),
Jina v3 (XLM-R with rotary) and Qwen3 apply them.

Each pair of rotated dims (x1, x2) of a head at position p turns by the angle p * inv_freq[i]:
(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Positions restart at 0 for each sequence (the caller
passes them, one per packed row), so a packed batch needs no padding and no per-sequence loop.

- `RotaryConfig`: base, rotated dims, pair layout, NTK scaling.
- `rotary_inv_freq`, `rotary_tables`: the frequencies and the per-token cos/sin [T, dim/2], computed in
  fp32 with the same torch expressions as transformers, so the tables match it bit for bit.
- `apply_rotary_ref`: plain torch in fp32 (the specification); equals transformers' `apply_rotary_pos_emb`
  bit for bit in fp32.
- `_rotary_kernel`: Triton; one launch rotates q and k in place, [ROWS, HEADS, PAIRS] tiles, the cos/sin
  slice of a row loaded once for all heads of q and k.
- `apply_rotary_`: the in-place launcher (the kernel where it can run, else the reference math in place).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import check, kernel_ok, next_pow2, tl, triton

SCALINGS = ("ntk",)


@dataclass(frozen=True)
class RotaryConfig:
    """How a model rotates its heads.

    dim: rotated dims per head (None: the whole head); a partial rotary rotates the first `dim` dims and
    leaves the rest untouched. interleaved: False pairs dim i with i + dim/2 (the "rotate_half" layout of
    transformers and GPT-NeoX); True pairs 2i with 2i + 1 (GPT-J, NomicBERT's `rotary_emb_interleaved`).
    scaling="ntk": GTE's fixed NTK scaling (see `rotary_inv_freq`), scaling_factor its `rope_scaling.factor`.
    """
    base: float = 10000.0
    dim: int | None = None
    interleaved: bool = False
    scaling: str | None = None
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.base, (int, float)) and math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"rotary base must be a positive number, got {self.base!r}")
        if self.dim is not None and not (isinstance(self.dim, int) and self.dim > 0 and self.dim % 2 == 0):
            raise ValueError(f"rotary dim must be a positive even number of dims (pairs), got {self.dim!r}")
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise ValueError(f"unsupported rotary scaling {self.scaling!r}; supported: {SCALINGS} or None")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)):
            raise ValueError(f"rotary scaling_factor must be a number, got {self.scaling_factor!r}")
        if self.scaling is None and self.scaling_factor != 1.0:
            raise ValueError(f"scaling_factor={self.scaling_factor} needs a scaling type (e.g. scaling='ntk')")
        if self.scaling == "ntk" and self.scaling_factor < 1.0:
            raise ValueError(f"NTK scaling needs scaling_factor >= 1, got {self.scaling_factor}")

    def rot_dim(self, head_dim: int) -> int:
        """The number of rotated dims in a head of `head_dim` dims (checked against it)."""
        d = head_dim if self.dim is None else self.dim
        if self.dim is not None and self.dim > head_dim:
            raise ValueError(f"rotary dim {self.dim} exceeds the head dim {head_dim}")
        if d <= 0 or d % 2:
            raise ValueError(f"the rotated dims must be a positive even number, got {d} (head dim {head_dim})")
        return d


def rotary_inv_freq(cfg: RotaryConfig, head_dim: int) -> torch.Tensor:
    """[dim/2] fp32 on the CPU: 1 / base ** (2i / dim), written as transformers writes it (and computed on
    the CPU, where transformers computes it when a model is built) so the values match to the last bit.

    NTK ("ntk"), as GTE's modeling code computes it (`NTKScalingRotaryEmbedding`, its "fixed NTK", i.e. with
    `mixed_b` unset): the base becomes base * factor and every frequency is further divided by
    factor ** (2 / dim), i.e. frequency i is divided by factor ** ((2i + 2) / dim): the slowest one by
    exactly `factor` (position interpolation), the fastest by factor ** (2 / dim). The scaled frequencies
    are fixed when the model is built (its cos/sin cache spans max_position_embeddings * factor positions),
    independent of the sequence length; sequences of any length use them. GTE's mixed variant (`mixed_b`)
    is not supported."""
    d = cfg.rot_dim(head_dim)
    if cfg.scaling == "ntk":
        f = float(cfg.scaling_factor)
        inv = 1.0 / ((cfg.base * f) ** (torch.arange(0, d, 2).float() / d))
        return inv / f ** (2 / d)
    return 1.0 / (cfg.base ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype=torch.float) / d))


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq_on(cfg: RotaryConfig, head_dim: int, device: torch.device) -> torch.Tensor:
    """rotary_inv_freq, copied to `device` once: a forward captured into a CUDA graph may not copy from
    the host (the graph runner's warm-up forward, run before capture, fills this cache)."""
    key = (cfg, head_dim, str(device))
    inv = _INV_FREQ.get(key)
    if inv is None:
        inv = _INV_FREQ[key] = rotary_inv_freq(cfg, head_dim).to(device)
    return inv


def rotary_tables(positions: torch.Tensor, cfg: RotaryConfig, head_dim: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] (int, restarting at 0 per sequence) -> (cos, sin), each [T, dim/2] on positions' device.

    The angles are position * inv_freq in fp32 (transformers' `position_ids[..., None].float() * inv_freq`);
    cos/sin are taken in fp32, then cast to `dtype`. fp32 tables (the default) are what the kernel reads
    best; tables in the model's fp16/bf16 reproduce transformers' own rounding of cos/sin there."""
    check(positions.dim() == 1 and not positions.is_floating_point() and not positions.is_complex(),
          f"positions must be a 1-D integer tensor [T], got {positions.dtype} of shape {tuple(positions.shape)}")
    inv = _inv_freq_on(cfg, head_dim, positions.device)                        # [dim/2]
    freqs = positions[:, None].float() * inv[None, :]                          # [T, dim/2]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _pair_views(x: torch.Tensor, rot: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the first and second members of each rotated pair: [..., rot/2] each."""
    if interleaved:
        return x[..., 0:rot:2], x[..., 1:rot:2]
    return x[..., : rot // 2], x[..., rot // 2: rot]


def _check_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: RotaryConfig,
                dtypes: tuple[torch.dtype, ...]) -> int:
    """Shared argument checks; returns the rotated dims."""
    check(isinstance(cfg, RotaryConfig), f"cfg must be a RotaryConfig, got {type(cfg).__name__}")
    check(q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
          f"q and k must be [T, H, D] with one T and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    check(q.dtype == k.dtype and q.dtype in dtypes,
          f"q and k need one dtype among {[str(d) for d in dtypes]}, got {q.dtype} and {k.dtype}")
    t, _, d = q.shape
    rot = cfg.rot_dim(d)
    check(cos.shape == sin.shape == (t, rot // 2),
          f"cos and sin must be [T, dim/2] = {(t, rot // 2)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    check(cos.dtype == sin.dtype and cos.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
          f"cos and sin need one floating dtype, got {cos.dtype} and {sin.dtype}")
    check(q.device == k.device == cos.device == sin.device,
          f"q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, {sin.device}")
    return rot


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cfg: RotaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) [T, H, D] rotated by the per-row angles of cos/sin [T, dim/2]; new tensors in q's dtype.

    Math in fp32 (fp64 for fp64 inputs), rounded once: x1 cos - x2 sin and x2 cos + x1 sin are the very
    operations of transformers' `x * cos + rotate_half(x) * sin` on the rotated dims (x2's sign flip is
    exact), so in fp32 the result equals it bit for bit. Dims past the rotated ones are copied."""
    rot = _check_args(q, k, cos, sin, cfg, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    acc = torch.promote_types(q.dtype, torch.float32)
    c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]                    # [T, 1, dim/2]
    outs = []
    for x in (q, k):
        x1, x2 = _pair_views(x.to(acc), rot, cfg.interleaved)                   # [T, H, dim/2] each
        y = x.clone(memory_format=torch.contiguous_format)                      # [T, H, D]; tail dims kept
        y1, y2 = _pair_views(y, rot, cfg.interleaved)
        y1.copy_(x1 * c - x2 * s)
        y2.copy_(x2 * c + x1 * s)
        outs.append(y)
    return outs[0], outs[1]


if triton is not None:
    @triton.jit
    def _rotate_tile(X, r64, heads, p1, p2, c, s, mask, stride_t, stride_h):
        """Rotate one [ROWS, HEADS, PAIRS] tile of X in place: fp32 math, one rounding on the store."""
        base = X + r64[:, None, None] * stride_t + heads[None, :, None] * stride_h
        x1 = tl.load(base + p1[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + p2[None, None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(base + p1[None, None, :], (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
        tl.store(base + p2[None, None, :], (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def pair_columns(pairs, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """The head dims of each rotated pair's two members: (2i, 2i + 1) interleaved, else (i, i + HALF)."""
        if INTERLEAVED:
            return 2 * pairs, 2 * pairs + 1
        return pairs, pairs + HALF

    @triton.jit
    def _rotary_kernel(Q, K, COS, SIN, T, HQ, HK, stride_qt, stride_qh, stride_kt, stride_kh,
                       HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)             # [BT]
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)            # [BH]
        pairs = tl.arange(0, BLOCK_P)                                          # [BP]
        row_ok = rows < T
        p_ok = pairs < HALF
        r64 = rows.to(tl.int64)
        cs_off = r64[:, None] * HALF + pairs[None, :]                          # contiguous [T, HALF] tables
        cs_mask = row_ok[:, None] & p_ok[None, :]
        c = tl.load(COS + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]   # [BT, 1, BP]
        s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        p1, p2 = pair_columns(pairs, HALF, INTERLEAVED)
        rp_ok = row_ok[:, None, None] & p_ok[None, None, :]
        _rotate_tile(Q, r64, heads, p1, p2, c, s, rp_ok & (heads < HQ)[None, :, None], stride_qt, stride_qh)
        _rotate_tile(K, r64, heads, p1, p2, c, s, rp_ok & (heads < HK)[None, :, None], stride_kt, stride_kh)


TILE = 2048     # elements per [ROWS, HEADS, PAIRS] tile (each of q's and k's two pair members)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cfg: RotaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (rows may be strided, e.g. `qkv.view(T, 3, H, D).unbind(1)`);
    returns (q, k). cos, sin: contiguous [T, dim/2] tables (`rotary_tables`), fp32 preferably.
    One Triton launch for q and k where the kernel can run; else the reference math written back in place."""
    rot = _check_args(q, k, cos, sin, cfg, (torch.float16, torch.bfloat16, torch.float32))
    check(q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last (head) dimension")
    check(cos.dtype != torch.float64 and cos.is_contiguous() and sin.is_contiguous(),
          f"cos and sin must be contiguous fp32/fp16/bf16 tables, got {cos.dtype}")
    check(q.numel() == 0 or q.data_ptr() != k.data_ptr(), "q and k must be distinct tensors (one would turn twice)")
    t, hq, _ = q.shape
    hk = k.shape[1]
    if not kernel_ok(q, k, cos, sin):
        acc = torch.float32
        c, s = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]                # [T, 1, dim/2]
        for x in (q, k):
            v1, v2 = _pair_views(x, rot, cfg.interleaved)                       # views into x
            x1, x2 = v1.to(acc), v2.to(acc)
            y1 = x1 * c - x2 * s                                               # both computed before writing
            y2 = x2 * c + x1 * s
            v1.copy_(y1)
            v2.copy_(y2)
        return q, k
    if t == 0 or max(hq, hk) == 0:
        return q, k
    half = rot // 2
    block_p = next_pow2(half)
    block_h = min(next_pow2(max(hq, hk)), max(1, TILE // block_p))
    block_t = max(1, TILE // (block_h * block_p))
    grid = (triton.cdiv(t, block_t), triton.cdiv(max(hq, hk), block_h))
    _rotary_kernel[grid](q, k, cos, sin, t, hq, hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         HALF=half, INTERLEAVED=cfg.interleaved, BLOCK_T=block_t, BLOCK_H=block_h,
                         BLOCK_P=block_p, num_warps=4)
    return q, k
