"""fp8 (e4m3) GEMMs for the encoder's four Linears, with the activations quantized per token.

Hopper's fp8 tensor cores run at twice the fp16 rate. The quantization, chosen so that a token's result
never depends on what else shares its batch:
- weights: e4m3 with one scale per output channel (`s_w = max|w_row| / 448`), quantized once at load;
- activations: e4m3 with one scale per token (`s_x = max|x_row| / 448`), computed by the kernel that
  produces the row (the fused LayerNorm, the bias+activation pass after FFN1; `quantize_rows` elsewhere),
  so no extra pass reads a row only to find its scale;
- the GEMM accumulates in fp32 and applies `acc * s_x[:, None] * s_w[None, :]`, the bias, the activation
  and the residual in its epilogue, writing the activation dtype (fp16 / bf16).

- `Quantized`: an activation in e4m3 with its row scales (and the same rows in fp16/bf16, where kept).
- `quantize_rows_ref` / `quantize_weight` / `fp8_linear_ref`: plain torch (the specification).
- `_quantize_rows_kernel` / `quantize_rows`: Triton, (bias +) (activation or GLU +) row quantization in one
  pass.
- `_fp8_gemm_kernel` / `fp8_linear`: Triton on Hopper (tiles moved by the TMA engine, persistent over
  the multiprocessors); `torch._scaled_mm` (row-wise scales, cuBLASLt/CUTLASS; bf16 output only) on other
  fp8 GPUs; the reference elsewhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._triton import INTERPRET, check, kernel_ok, next_pow2, tl, triton
from .gelu import ACTS, act_ref
from .linear_act import TileConfig

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# scales are amax * (1/448) (the fp32 reciprocal, multiplied): torch divides by a scalar that way on CUDA
# and by IEEE division on a CPU, so a product is the one form every device and the kernels compute alike
INV_E4M3_MAX = 1.0 / 448.0
# a row of zeros gets this amax (scale 2.2e-15), so no division by zero; its codes are all zero
MIN_AMAX = 1e-12


@dataclass
class Quantized:
    """An activation [T, K] in e4m3 with one fp32 scale per row: row i is `q[i] * scale[i]`. `x` holds the
    same rows in the activation dtype where the producer also wrote them (post-norm stacks reuse a
    LayerNorm's output as the next residual)."""

    q: torch.Tensor                      # [T, K] float8_e4m3fn
    scale: torch.Tensor                  # [T] fp32
    x: torch.Tensor | None = None        # [T, K] fp16/bf16, or None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]                                      # [T, K] fp32


def quantize_rows_ref(x: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
                      keep: bool = False, glu: bool = False) -> Quantized:
    """act(x + bias) (in fp32, rounded once to x's dtype) quantized per row to e4m3; `keep` also returns
    the rounded rows as `.x`. glu: x is [T, 2F] = [gate | up] and the rows are act(gate) * up, [T, F]."""
    y = x.float()
    if bias is not None:
        y = y + bias.float()
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = act_ref(gate, act) * up
    elif act is not None:
        y = act_ref(y, act)
    y = y.to(x.dtype)
    yf = y.float()
    scale = yf.abs().amax(dim=-1).clamp_min(MIN_AMAX) * INV_E4M3_MAX                    # [T]
    q = (yf * (1.0 / scale)[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)    # by the reciprocal, as the kernels
    return Quantized(q, scale, y if keep else None)


def empty_quantized(y: torch.Tensor) -> Quantized:
    """Buffers for a fused norm's quantized output of y [T, H] (y itself kept as `.x`)."""
    t, h = y.shape
    return Quantized(torch.empty(t, h, dtype=E4M3, device=y.device), torch.empty(t, dtype=torch.float32,
                                                                                 device=y.device), y)


def quantized_result(res, return_sum: bool):
    """A fused norm's reference result (y, or (y, s)) with y quantized, as the kernels return it."""
    y, s = res if return_sum else (res, None)
    qy = quantize_rows_ref(y)
    qy.x = y
    return (qy, s) if return_sum else qy


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's [N, K] weight -> (e4m3 [N, K], fp32 scales [N]): one scale per output channel."""
    qw = quantize_rows_ref(weight.detach().float())
    return qw.q.contiguous(), qw.scale.contiguous()


def fp8_linear_ref(a: Quantized, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
                   act: str | None = None, residual: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """act(dequant(a) @ dequant(w)^T + bias) + residual, in fp32, rounded once to out_dtype
    (the residual's dtype when given)."""
    y = a.dequantize() @ (wq.float() * ws[:, None]).t()                                   # [T, N]
    if bias is not None:
        y = y + bias.float()
    if act is not None:
        y = act_ref(y, act)
    if residual is not None:
        y = y + residual.float()
    dtype = residual.dtype if residual is not None else out_dtype
    return y.to(dtype or torch.float16)


if triton is not None:
    from .gelu import _act

    _EXACT_ROUND = tl.constexpr(INTERPRET)      # a kernel reads module globals only as constexprs

    @triton.jit
    def _round_e4m3(v, EXACT: tl.constexpr):
        """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic, so the
        cast that follows is exact. Adding and taking away c = 1.5 * 2^(e + 20) leaves v in a binade whose
        fp32 step is e4m3's step at v's exponent e (2^(e - 3), and 2^-9 below the normal range). Only under
        Triton's interpreter (EXACT; the CPU tests), which rounds fp32 -> fp8 without carrying into the
        exponent; a GPU's cvt rounds to nearest even itself, and these ~10 operations per element made the
        GELU + quantize pass compute-bound on an H200."""
        if EXACT:
            e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
            c = ((e + 147) << 23).to(tl.float32, bitcast=True) * 1.5
            v = (v + c) - c
        return v

    @triton.jit
    def _quantize(y, MAX: tl.constexpr, MIN_A: tl.constexpr):
        """y [R, C] fp32 (0 in masked columns) -> (e4m3 values [R, C], still fp32; scales [R]). The row is
        multiplied by its scale's reciprocal, an IEEE division once per row (div_rn: Triton's `/` is
        approximate on a GPU), as quantize_rows_ref does, so the codes are bit for bit the reference's."""
        scale = tl.maximum(tl.max(tl.abs(y), axis=1), MIN_A) * (1.0 / MAX)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        return _round_e4m3(tl.clamp(y * inv[:, None], -MAX, MAX), _EXACT_ROUND), scale

    @triton.jit
    def store_quantized_row(y, mask, row, cols, Q, QS, stride_q, MAX: tl.constexpr, MIN_A: tl.constexpr):
        """The fused norms' e4m3 output: one row y [BLOCK], already rounded to the activation dtype (masked
        columns ignored), quantized as quantize_rows would, into Q's row `row` and its scale into QS[row]."""
        q, scale = _quantize(tl.where(mask, y.to(tl.float32), 0.0)[None, :], MAX, MIN_A)   # [1, BLOCK], [1]
        tl.store(Q + row * stride_q + cols[None, :], q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=mask[None, :])
        tl.store(QS + row + tl.arange(0, 1), scale)

    @triton.jit
    def _quantize_rows_kernel(X, BIAS, Q, S, Y, T, N, stride_x, stride_q, stride_y, HAS_BIAS: tl.constexpr,
                              HAS_ACT: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, KEEP: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX: tl.constexpr, MIN_A: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        rmask = rows < T
        mask = rmask[:, None] & (cols[None, :] < N)
        r64 = rows.to(tl.int64)[:, None]
        y = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GLU:          # N is F; the up half of the row starts at column F
            u = tl.load(X + r64 * stride_x + N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                u += tl.load(BIAS + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            y = _act(y, ACT) * u
        elif HAS_ACT:
            y = _act(y, ACT)
        yr = y.to(Y.dtype.element_ty)                  # rounded once to the activation dtype, as the reference
        if KEEP:
            tl.store(Y + r64 * stride_y + cols[None, :], yr, mask=mask)
        q, scale = _quantize(tl.where(mask, yr.to(tl.float32), 0.0), MAX, MIN_A)           # [ROWS, BLOCK], [ROWS]
        tl.store(Q + r64 * stride_q + cols[None, :], q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(S + rows, scale, mask=rmask)


def quantize_rows(x: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
                  keep: bool = False, glu: bool = False, rows: int | None = None,
                  num_warps: int | None = None) -> Quantized:
    """act(x + bias) per row to e4m3 with its row scales (see `quantize_rows_ref`): [T, N] -> Quantized
    (glu: [T, 2F] -> [T, F]). After FFN1 this is the bias + activation (or GLU) pass itself, so FFN2's
    input costs no extra read."""
    check(x.dim() == 2 and x.stride(1) == 1, f"x must be [T, N] with contiguous rows, got shape {tuple(x.shape)}")
    check(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}")
    check(act is None or act in ACTS, f"unknown activation {act!r}; expected one of {tuple(ACTS)}")
    check(not glu or (act is not None and x.shape[1] % 2 == 0), "glu needs an activation and x = [T, 2F]")
    if bias is not None:
        check(bias.shape == (x.shape[1],) and bias.is_contiguous() and bias.device == x.device,
              f"bias must be a contiguous [{x.shape[1]}] vector on {x.device}, got {tuple(bias.shape)}")
    if not kernel_ok(x):
        return quantize_rows_ref(x, bias, act, keep, glu)
    t, n = x.shape[0], x.shape[1] // 2 if glu else x.shape[1]
    q = torch.empty(t, n, dtype=E4M3, device=x.device)
    s = torch.empty(t, dtype=torch.float32, device=x.device)
    y = torch.empty(t, n, dtype=x.dtype, device=x.device) if keep else None
    if t:
        block = next_pow2(n)
        rows = rows or max(1, min(16, 8192 // block))
        _quantize_rows_kernel[(triton.cdiv(t, rows),)](
            x, bias if bias is not None else x, q, s, y if keep else x, t, n, x.stride(0), q.stride(0),
            y.stride(0) if keep else 0, HAS_BIAS=bias is not None, HAS_ACT=act is not None,
            ACT=ACTS[act] if act is not None else 0, GLU=glu, KEEP=keep, ROWS=rows, BLOCK=block, MAX=E4M3_MAX,
            MIN_A=MIN_AMAX, num_warps=num_warps or (8 if block >= 2048 else 4))
    return Quantized(q, s, y)


# fp8 holds twice the K per byte of fp16: 128-deep K tiles move the same bytes as fp16's 64
SMALL = TileConfig(64, 128, 128, 8, 4, 4)
LARGE = TileConfig(128, 256, 128, 8, 8, 3)
WIDE = TileConfig(64, 256, 128, 8, 4, 4)
# a residual in the epilogue: 128 x 128 tiles, 4 stages (a 128 x 256 tile's layout conversion for the residual
# leaves room for 2 stages only: 240 KB for 3, over the H200's 227 KB)
RES = TileConfig(128, 128, 128, 8, 8, 4)


def default_config(m: int, n: int, k: int, residual: bool = False) -> TileConfig:
    """Measured on an H200 (benchmarks/gpu_fastpath.py --sections fp8_gemm,fp8_roles; NOTES-gpu.md):
    - no residual: LARGE was the fastest or within 5% on bert-base's and xlmr-large's QKV and FFN1 at 4,096
      and 35,201 tokens (within 10% at 2,209), except 768 x 768 (126 us against 54 for WIDE at 35,201 tokens);
    - a residual (out-projection, FFN2): RES, the fastest or within 1 us of it at 2,209 and 35,201 tokens
      (bert-base FFN2 at 35,201: 162 us against 209 for 128 x 256 tiles in 2 stages; at 2,209: 18.2 against
      23.9 for SMALL);
    - SMALL keeps the multiprocessors busy on a few hundred tokens."""
    def tiles(cfg: TileConfig) -> int:           # output tiles of an [m, n] result in cfg's tiles
        return -(-m // cfg.block_m) * -(-n // cfg.block_n)

    if residual:
        return SMALL if tiles(RES) < 66 else RES
    if tiles(LARGE) < 66:
        return SMALL
    if n <= 768 and k <= 768:
        return WIDE
    return LARGE


if triton is not None:
    from .linear_act import tma_tile

    @triton.jit
    def _fp8_gemm_kernel(a_desc, w_desc, c_desc, R, stride_r, SA, SW, BIAS, M, N, K, HAS_BIAS: tl.constexpr,
                         HAS_ACT: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS):
        """C = act(A W^T * s_a s_w + bias) + R over e4m3 tiles moved by the TMA engine; persistent: each
        program walks tiles NUM_PROGRAMS apart in grouped order (GROUP_M row tiles share a weight tile).
        The residual is read straight into registers: a TMA tile of it would not fit LARGE's shared memory."""
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS,
                             flatten=True):
            off_m, off_n, acc = tma_tile(a_desc, w_desc, tile, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
            rm = off_m + tl.arange(0, BLOCK_M)
            rn = off_n + tl.arange(0, BLOCK_N)
            sa = tl.load(SA + rm, mask=rm < M, other=0.0)
            sw = tl.load(SW + rn, mask=rn < N, other=0.0)
            acc = acc * sa[:, None] * sw[None, :]
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if HAS_ACT:
                acc = _act(acc, ACT)
            if HAS_RES:
                rmask = (rm[:, None] < M) & (rn[None, :] < N)
                acc += tl.load(R + rm.to(tl.int64)[:, None] * stride_r + rn[None, :], mask=rmask,
                               other=0.0).to(tl.float32)
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> tuple[int, int]:
    """(major compute capability, SM count) of CUDA device `index`, asked once: an eager fp8 forward launches
    ~50 GEMMs, and the host's time per launch is what bounds it (benchmarks/NOTES-gpu.md)."""
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count


def _tma_ok(a: Quantized, wq: torch.Tensor) -> bool:
    """The TMA kernel's needs: Hopper or later (or the interpreter), 16-byte aligned rows."""
    n, k = wq.shape
    if k % 16 or n % 8:
        return False
    return not a.q.is_cuda or _gpu(a.q.device.index)[0] >= 9       # a tensor's device always has its index


def _scaled_mm(a: Quantized, wq, ws, bias, act, residual, out_dtype) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales (its kernel writes bf16 only); the epilogue in torch."""
    y = torch._scaled_mm(a.q, wq.t(), scale_a=a.scale[:, None], scale_b=ws[None, :],
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    if act is not None:
        y = act_ref(y.float(), act)
    y = y.to(out_dtype)
    return y if residual is None else residual.add_(y)


BACKENDS = ("auto", "triton", "scaled_mm", "reference")


def fp8_linear(a: Quantized, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
               act: str | None = None, residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               config: TileConfig | None = None, backend: str = "auto") -> torch.Tensor:
    """act(a W^T + bias) (+ residual, which is then updated in place and returned): a [T, K] Quantized,
    wq [N, K] e4m3, ws [N] fp32 -> [T, N] in out_dtype (the residual's dtype when given).

    backend "auto": the Triton TMA kernel on Hopper (and under the interpreter), torch._scaled_mm on other
    fp8 GPUs, the reference on CPU."""
    check(backend in BACKENDS, f"unknown fp8 backend {backend!r}; expected one of {BACKENDS}")
    check(a.q.dim() == 2 and a.q.dtype == E4M3 and a.q.is_contiguous(),
          f"a.q must be a contiguous [T, K] float8_e4m3fn tensor, got {a.q.dtype} {tuple(a.q.shape)}")
    check(wq.dim() == 2 and wq.dtype == E4M3 and wq.is_contiguous() and wq.shape[1] == a.q.shape[1],
          f"weight must be a contiguous [N, K={a.q.shape[1]}] float8_e4m3fn tensor, got {wq.dtype} {tuple(wq.shape)}")
    t, n = a.q.shape[0], wq.shape[0]
    check(a.scale.shape == (t,) and a.scale.dtype == torch.float32, f"a.scale must be fp32 [{t}]")
    check(ws.shape == (n,) and ws.dtype == torch.float32, f"weight scales must be fp32 [{n}]")
    check(act is None or act in ACTS, f"unknown activation {act!r}; expected one of {tuple(ACTS)}")
    if bias is not None:
        check(bias.shape == (n,) and bias.is_contiguous(), f"bias must be a contiguous [{n}] vector")
    if residual is not None:
        check(residual.shape == (t, n) and residual.is_contiguous(),
              f"residual must be a contiguous [{t}, {n}] tensor, got {tuple(residual.shape)}")
        out_dtype = residual.dtype
    out_dtype = out_dtype or torch.float16
    check(out_dtype in (torch.float16, torch.bfloat16), f"fp8_linear writes fp16 or bf16, not {out_dtype}")
    tma = None
    if backend == "auto":
        if not kernel_ok(a.q, wq):
            backend = "reference"
        elif tma := _tma_ok(a, wq):
            backend = "triton"
        else:
            backend = "scaled_mm" if a.q.is_cuda else "reference"
    if backend == "reference":
        y = fp8_linear_ref(a, wq, ws, bias, act, residual, out_dtype)
        return y if residual is None else residual.copy_(y)
    if backend == "scaled_mm":
        return _scaled_mm(a, wq, ws, bias, act, residual, out_dtype)
    check(tma or _tma_ok(a, wq), "the Triton fp8 GEMM needs Hopper (sm90+), K % 16 == 0 and N % 8 == 0")
    return _fp8_gemm(a, wq, ws, bias, act, residual, out_dtype, config)


def _fp8_gemm(a: Quantized, wq, ws, bias, act, residual, out_dtype, config) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, k = a.q.shape
    n = wq.shape[0]
    y = residual if residual is not None else torch.empty(t, n, dtype=out_dtype, device=a.q.device)
    if t == 0:
        return y
    cfg = config or default_config(t, n, k, residual is not None)
    tiles = triton.cdiv(t, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    sms = _gpu(a.q.device.index)[1] if a.q.is_cuda else tiles
    progs = min(tiles, sms)
    c_desc = TensorDescriptor.from_tensor(y, [cfg.block_m, cfg.block_n])
    _fp8_gemm_kernel[(progs,)](
        TensorDescriptor.from_tensor(a.q, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(wq, [cfg.block_n, cfg.block_k]), c_desc, y, y.stride(0), a.scale, ws,
        bias if bias is not None else ws, t, n, k, HAS_BIAS=bias is not None, HAS_ACT=act is not None,
        ACT=ACTS[act] if act is not None else 0, HAS_RES=residual is not None, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_PROGRAMS=progs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
