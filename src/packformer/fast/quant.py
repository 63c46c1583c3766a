"""int8 mode for the Linear layers of the CPU path (`packformer.load(..., quantize="int8")`).

The quantization, per row so that a token's result never depends on what else shares its batch:
- weights: int8, symmetric, one scale per output channel (`s_w = max|w| / 127`), quantized once at load
  (7-bit, `/ 63`, where the CPU's int8 GEMM adds pairs of u8 x s8 products in int16 and 8 bits would
  saturate: AVX2 and AVX-512 without VNNI; `int8_weight_qmax` finds out by running the kernel);
- activations: int8, symmetric, one scale per row (token) from the row's own range at run time
  (`s_x = max|x| / 127`, `q = round(x / s_x)`);
- GEMM in integers with int32 accumulation, then `y = acc * s_x[:, None] * s_w[None, :] + bias`
  (+ activation or residual), in fp32;
- a few fixed input channels per Linear stay fp32 (`calibrate_outliers`, found once at load): encoders
  carry huge "outlier" channels in every token, and a row scale set by one of them leaves ~7 levels for
  the other channels. all-MiniLM-L6-v2 vs fp32, min embedding cosine: 0.9967 with them, 0.9755 without.

Why this kernel (benchmarks/NOTES-cpu.md; 2-core Xeon, AVX512-VNNI, no AMX): torch's fbgemm dynamic op
(`quantized.linear_dynamic`, what torch.ao `quantize_dynamic` runs) takes one activation scale per
*tensor*, from the batch's largest activation: an embedding changed with its batch neighbours (min
cosine 0.976). The oneDNN int8 GEMM that inductor's x86 lowering emits (`onednn.qlinear_pointwise`,
uint8 activations, int8 weights prepacked once) also takes one scale per call, but is exact integer math:
fed the row-quantized values with scale 1 and zero point 128 it returns `acc * s_w`, and the row scale
and bias follow in place. `torch._int_mm` runs the GEMM as fast but returns int32, one more full pass to
dequantize; int8 (not uint8) activations into qlinear_pointwise hit a reference kernel (~1000x slower);
torchao is slower than fp32 in eager mode. Rows go in blocks of BLOCK_ROWS so the quantize / dequantize
passes run on data still in L2 (whole-batch passes: 1.6x slower). MiniLM offline_b128, 2 threads, one
run: fp32 974 ms, bf16 1364 ms, this 739 ms (the per-tensor fbgemm mode it replaces: ~5% faster on
offline_b128, ~40% on serve_b32, where these eager passes weigh more).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .cpu_linear import OneDnnLinear, act_, onednn_available

QUANTIZE_MODES = ("int8",)
BLOCK_ROWS = 512            # rows per quantize -> GEMM -> dequantize block (measured: 256-1024 within 3%)
_ZERO_POINT = 128           # uint8 activations: q + 128; oneDNN subtracts it back, exactly
OUTLIER_CHANNELS = 8        # input channels per Linear kept in fp32 (calibrate_outliers)
CALIBRATION_LENGTHS = [8, 24, 64, 160]


def _int8_gemm(xq: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
               weight_zero: torch.Tensor) -> torch.Tensor:
    """uint8 [m, K] (q + 128) -> fp32 acc * s_w [m, out]: oneDNN's integer GEMM, exact int32 sums."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, _ZERO_POINT, packed, weight_scale, weight_zero,
                                              None, 1.0, 0, torch.float32, "none", [], "")


def _gemm_is_exact(qmax: int) -> bool:
    """Whether oneDNN's int8 GEMM returns the exact integer sums for weights in [-qmax, qmax], on the
    rows where an int16 pair sum would saturate first (all +127 or all -127 against all +-qmax), in a
    small and a large row count (oneDNN picks its kernel by shape)."""
    k, n = 64, 16
    g = torch.Generator().manual_seed(0)
    wq = torch.randint(-qmax, qmax + 1, (n, k), generator=g).to(torch.int8)            # [out, in]
    wq[0], wq[1], wq[2] = qmax, -qmax, torch.tensor([qmax, -qmax]).repeat(k // 2)
    q = torch.randint(-127, 128, (300, k), generator=g)                                # [T, in]
    q[0::3] = 127
    q[1::3] = -127
    packed = torch.ops.onednn.qlinear_prepack(wq, None)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
    want = (q.double() @ wq.double().T).float()                    # |sums| < 2^24: exact in fp32
    return all(torch.equal(_int8_gemm((q[:m] + _ZERO_POINT).to(torch.uint8), packed, ones, zeros), want[:m])
               for m in (3, 300))


@functools.lru_cache(maxsize=1)
def int8_weight_qmax() -> int | None:
    """The widest weight range whose int8 GEMMs are exact on this CPU, found by running the kernel:
    127 where it sums int8 products in int32 (VNNI, AMX); 63 where it adds pairs of u8 x s8 products in
    int16 first (`vpmaddubsw` on AVX2 / AVX-512 without VNNI, where 255 * 127 * 2 saturates and
    255 * 63 * 2 < 32767 cannot); None when neither is exact, or the ops are missing. Probing the kernel,
    not the CPU flags, follows whatever ISA oneDNN really runs (ONEDNN_MAX_CPU_ISA included)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            return None
        if not onednn_available(torch.float32):       # the fp32 outlier part runs through it too
            return None
        with torch.inference_mode():
            return next((qmax for qmax in (127, 63) if _gemm_is_exact(qmax)), None)
    except Exception:  # pragma: no cover - depends on the torch build
        return None


def int8_available() -> bool:
    """Whether this torch build has the oneDNN int8 ops and runs them exactly (at some weight range)."""
    return int8_weight_qmax() is not None


def check_quantize(quantize: str | None) -> str | None:
    """None or "int8"; anything else is a ValueError naming the accepted modes."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unsupported quantize={quantize!r}; expected None or one of {QUANTIZE_MODES}")
    if not int8_available():
        raise RuntimeError("quantize='int8' needs torch.ops.onednn.qlinear_pointwise, which this torch build "
                           f"({torch.__version__}) lacks or runs wrongly; load without quantize")
    return quantize


# ---- the reference: plain torch, readable, the definition of the quantization ----------------------

def quantize_weight_ref(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] fp32 -> (int8 [out, in] in [-qmax, qmax], fp32 scale [out]): symmetric, per output channel."""
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8), scale


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] fp32 -> (int8 [T, K], fp32 scale [T, 1]): symmetric, one scale per row, round to nearest."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    outliers: torch.Tensor | None = None, weight_qmax: int = 127) -> torch.Tensor:
    """The int8 linear in plain torch: the `outliers` input channels in fp32, the others quantized (row
    scales taken over them only), integer products summed exactly (float64), then both scales."""
    x, w = x.float(), weight.detach().float()
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    if outliers is not None and outliers.numel():
        y += x[:, outliers].double() @ w[:, outliers].double().T
        x, w = x.index_fill(1, outliers, 0.0), w.index_fill(1, outliers, 0.0)
    xq, sx = quantize_rows_ref(x)
    wq, sw = quantize_weight_ref(w, weight_qmax)
    y += (xq.double() @ wq.double().T) * sx.double() * sw.double()[None, :]           # [T, out], exact sums
    y = y.float()
    return y if bias is None else y + bias.detach().float()


# ---- the kernel ------------------------------------------------------------------------------------

def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] fp32 -> (uint8 [T, K] = q + 128, fp32 scale [T, 1]), q as in `quantize_rows_ref` except
    that ties round up (q = floor(x / s + 0.5)): four cheap passes instead of round + clamp + cast."""
    amax = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_()).clamp_(min=1e-30)  # [T, 1]
    inv = torch.reciprocal(amax).mul_(127.0)
    # x * inv lies in [-127, 127]; + 128.5 then truncation (to uint8) is round-half-up, shifted by 128
    return torch.mul(x, inv).add_(_ZERO_POINT + 0.5).to(torch.uint8), amax.div_(127.0)


class DynamicInt8Linear:
    """y = x W^T + b with int8 W (per output channel) and x quantized per row at run time; fp32 in and out.
    `outliers`: input channels kept in fp32 (a fixed set, from `calibrate_outliers`): the row scale then
    comes from the other channels. Called like the other CPU linears:
    `lin(x, act=None, residual=None, out=None)`.

    Every step computes each row on its own, so a row's result does not depend on the other rows: the
    integer GEMM is exact, the quantize / scale / add passes are elementwise, and the fp32 outlier GEMM
    runs in oneDNN (whose kernels sum a row in the same order at any row count), not in `addmm`, whose
    BLAS kernel changes its summation order with the row count; a last-bit difference there would move
    a value across a rounding boundary of the next layer's quantization and change the result by a
    whole quantization step."""

    def __init__(self, linear: nn.Linear, outliers: torch.Tensor | None = None, block_rows: int = BLOCK_ROWS,
                 weight_qmax: int | None = None):
        supported = int8_weight_qmax()
        if supported is None:
            raise RuntimeError("int8 linears need torch.ops.onednn.qlinear_pointwise running exactly, which this "
                               f"torch build ({torch.__version__}) on this CPU does not")
        if weight_qmax is not None and not 1 <= weight_qmax <= supported:
            raise ValueError(f"weight_qmax={weight_qmax}: int8 GEMMs on this CPU are exact only for weights "
                             f"in [-{supported}, {supported}]")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_rows = block_rows
        w = linear.weight.detach().float()                                            # [out, in]
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.outliers = None if outliers is None or outliers.numel() == 0 else outliers.to(torch.int64)
        self.outlier_linear = None
        if self.outliers is not None:                                                 # fp32 part, bias folded in
            part = nn.Linear(len(self.outliers), self.out_features, bias=bias is not None)
            with torch.no_grad():
                part.weight.copy_(w[:, self.outliers])
                if bias is not None:
                    part.bias.copy_(bias)
            self.outlier_linear = OneDnnLinear(part, torch.float32)
            w = w.index_fill(1, self.outliers, 0.0)
        self.weight_qmax = supported if weight_qmax is None else weight_qmax
        self.weight_int8, self.weight_scale = quantize_weight_ref(w, self.weight_qmax)  # [out, in], [out]
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)        # oneDNN blocked layout
        self.weight_zero = torch.zeros(self.out_features, dtype=torch.int64)
        self.bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor, act: str | None = None, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[0]
        out = torch.empty(t, self.out_features, dtype=torch.float32) if out is None else out
        for r0 in range(0, t, self.block_rows):
            r1 = min(t, r0 + self.block_rows)
            xb = x[r0:r1]
            if self.outliers is None:
                xq, sx = quantize_rows(xb)
            else:
                xq, sx = quantize_rows(xb.index_fill(1, self.outliers, 0.0))
            o = torch.mul(_int8_gemm(xq, self.packed, self.weight_scale, self.weight_zero), sx,
                          out=out[r0:r1])                                            # acc * s_w * s_x
            if self.outlier_linear is not None:
                o.add_(self.outlier_linear(xb.index_select(1, self.outliers)))       # + fp32 part + bias
            elif self.bias is not None:
                o.add_(self.bias)
            if residual is not None:
                o.add_(residual[r0:r1])
            else:
                act_(o, act)
        return out


def calibrate_outliers(encoder: nn.Module, k: int = OUTLIER_CHANNELS, seed: int = 0) -> dict[nn.Linear, torch.Tensor]:
    """For each nn.Linear of `encoder`'s layers, the `k` input channels with the largest |activation| on a
    fixed batch of random non-special token ids (the fp32 reference forward, ~256 tokens). Transformer
    encoders carry a few huge "outlier" channels in every token, whatever the text; a row scale set by
    one of them leaves ~7 levels for the rest. Fixed at load, so results stay batch-independent."""
    from ..batch import pack

    cfg = encoder.config
    lo, hi = cfg.regular_id_range()
    g = np.random.default_rng(seed)
    # a model with fewer positions calibrates on sequences of its own maximum length
    lengths = [min(n, cfg.max_tokens_per_sequence) for n in CALIBRATION_LENGTHS]
    batch = pack([g.integers(lo, hi, size=n).tolist() for n in lengths], cfg.position_offset)
    amax: dict[nn.Linear, torch.Tensor] = {}

    def record(mod: nn.Module, inputs: tuple) -> None:
        m = inputs[0].detach().abs().amax(0).float()
        amax[mod] = m if mod not in amax else torch.maximum(amax[mod], m)

    linears = [m for layer in encoder.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.inference_mode():
            encoder(batch)
    finally:
        for h in hooks:
            h.remove()
    return {m: a.topk(min(k, a.numel())).indices.sort().values for m, a in amax.items()}
