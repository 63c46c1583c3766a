"""fp8 (e4m3) GEMMs on the CUDA fast path: `packformer.load(..., dtype="float8")`.

The four Linears of every layer (QKV, out-projection, FFN1, FFN2) run in e4m3 with fp32 accumulation
(ops/fp8.py); everything between them (attention, norms, residual stream, activations) stays in the
family's half dtype (fp16 encoders, bf16 decoders). Per layer (post-norm):

  x  [T, H] fp16 + x8 e4m3 + s_x [T]       the previous LayerNorm writes both (ops/layernorm.py, quantize=True)
  qkv = x8 Wqkv8^T * s_x s_w + b            fp8 GEMM, fp16 out
  a   = flash_varlen(q, k, v)               fp16; then one quantize_rows pass (a token's scale spans all
                                            heads, which no flash program sees at once)
  x   = LN(x + a8 Wo8^T ... + b_o)          fp8 GEMM with the residual in its epilogue, then the LayerNorm
  h8  = quantize(GELU(x8 W18^T ... + b_1))  fp8 GEMM with bias + GELU in its epilogue, then a quantize pass
                                            (bias + GELU + quantize in one pass measured 268 us against 133 for
                                            the fp16 bias + GELU pass at [35201, 3072]: erf made it compute-bound)
  x   = LN(x + h8 W28^T ... + b_2)          as for the out-projection

RMSNorm stacks quantize in add_rmsnorm, GLU feed-forwards in the GLU pass (quantize_rows(glu=True)); the
embeddings and the attention output are quantized by `quantize_rows` where they are read.
`check_device` refuses GPUs without fp8 tensor cores; `accuracy_report` / `guard` compare fp8 with
the half-precision fast path on a fixed calibration set at load (pooled embeddings, token rows, class
argmax) and refuse fp8 below MIN_COSINE unless forced.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..ops.fp8 import Quantized, fp8_linear, quantize_rows, quantize_weight
from ..ops.layernorm import add_layernorm
from ..ops.rmsnorm import add_rmsnorm
from .cuda import CudaPrimitives

log = logging.getLogger(__name__)

MIN_COSINE = 0.999                 # below it (min over the calibration set, vs fp16/bf16) fp8 is refused
MIN_CAPABILITY = (8, 9)            # Ada and Hopper: fp8 tensor cores

# The calibration set: short and long, several scripts, digits, emoji and a text past 512 tokens, so that
# rows of every length class and unusual tokens are in it. Fixed, so the report is reproducible.
CALIBRATION_TEXTS = (
    "hi",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France, on the Seine.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la biblioteca más cercana a la estación?",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京は日本の首都であり、世界最大級の都市圏を持つ。",
    "Москва — столица России и крупнейший город страны.",
    "مرحبا بكم في عالم معالجة اللغات الطبيعية",
    "Error 404: page not found at https://example.com/a/b?c=1&d=2 (retry in 30 s)",
    "🚀🔥 launch day! 🎉 " * 4,
    "def f(x):\n    return [i * i for i in range(x) if i % 3 == 0]",
    "Transformer encoders turn a sequence of tokens into contextual vectors; inference servers batch many "
    "requests of different lengths, and packing them without padding saves the work padding would waste. " * 3,
    "A very long paragraph that runs past the usual limit of the model, repeated so that every position "
    "up to the maximum sequence length is exercised by the calibration set. " * 20,
    "0 1 2 3 4 5 6 7 8 9 " * 6,
)


def check_device(device: torch.device, fast: bool | None) -> None:
    """A clear error where fp8 cannot run: not CUDA, no fp8 tensor cores, or the fast path turned off."""
    if device.type != "cuda":
        raise ValueError(f"dtype='float8' runs the encoder's GEMMs on a GPU's fp8 tensor cores; device is {device}"
                         " (on a CPU, quantize='int8' is the quantized mode)")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ValueError(f"dtype='float8' needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper or later); "
                         f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}. Use dtype='float16'")
    if fast is False:
        raise ValueError("dtype='float8' is a mode of the CUDA fast path; it cannot run with fast=False")


@dataclass
class Fp8Weight:
    """One Linear's weight in e4m3 with its per-output-channel scales."""

    q: torch.Tensor          # [N, K] float8_e4m3fn
    scale: torch.Tensor      # [N] fp32


def gemm_linears(encoder):
    """The Linears that run in e4m3: the four of every layer."""
    for layer in encoder.layers:
        yield from (layer.qkv, layer.out, layer.ffn1, layer.ffn2)


def quantize_layers(encoder) -> dict[int, Fp8Weight]:
    """id(Linear) -> its e4m3 weight, for every gemm_linears one (quantized once, at load)."""
    return {id(lin): Fp8Weight(*quantize_weight(lin.weight)) for lin in gemm_linears(encoder)}


class Fp8Primitives(CudaPrimitives):
    """CudaPrimitives with the GEMMs in e4m3. Activations flow as tensors or as `Quantized` (a producer
    that already quantized its rows); each GEMM quantizes what arrives unquantized."""

    def __init__(self, fast, backend: str = "auto"):
        super().__init__(fast)
        self.weights = quantize_layers(fast.encoder)
        self.backend = backend

    def describe(self) -> str:
        return f"fp8 e4m3 ({self.backend}), per-token activation and per-channel weight scales"

    def _q(self, x) -> Quantized:
        return x if isinstance(x, Quantized) else quantize_rows(x)

    def _gemm(self, x, lin, bias=None, act=None, residual=None) -> torch.Tensor:
        w = self.weights[id(lin)]
        return fp8_linear(self._q(x), w.q, w.scale, bias, act, residual, out_dtype=self.fast.dtype,
                          backend=self.backend)

    def linear(self, x, lin, bias: bool = True) -> torch.Tensor:
        return self._gemm(x, lin, lin.bias if bias else None)

    def linear_add_(self, x, lin, residual: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, lin, residual=residual)

    # the norms after a sublayer quantize their output for the next GEMM, except the forward's last
    # output (written into `out`) and a norm with no weight (the plain sum, which feeds no GEMM)
    def layernorm(self, s, norm, **kw):
        return add_layernorm(s, norm.weight, norm.bias, norm.eps, quantize=kw.get("out") is None, **kw)

    def rmsnorm(self, s, weight, eps, **kw):
        return add_rmsnorm(s, weight, eps, quantize=kw.get("out") is None and weight is not None, **kw)

    def ffn_hidden(self, layer, x) -> Quantized:
        if layer.glu:       # act(gate) * up and its quantization in one pass
            return quantize_rows(self.linear(x, layer.ffn1), act=layer.act, glu=True)          # [T, F] e4m3
        # bias + activation in the GEMM's epilogue, then the quantize pass
        return quantize_rows(self._gemm(x, layer.ffn1, layer.ffn1.bias, layer.act))        # [T, F] e4m3

    def project_add_norm(self, a, lin, residual, norm, keep_sum=False, out=None, post=None):
        if isinstance(residual, Quantized):      # post-norm: the LayerNorm output is also the residual
            residual = residual.x
        return super().project_add_norm(a, lin, residual, norm, keep_sum, out, post)


def fp8_primitives(runner) -> Fp8Primitives | None:
    """The Fp8Primitives under a runner (FastEncoder, or the CUDA graphs over one); None if it has none."""
    prims = getattr(getattr(runner, "forward", runner), "primitives", None)
    return prims if isinstance(prims, Fp8Primitives) else None


def release_half_weights(runner) -> int:
    """Drop the fp16/bf16 weights of the GEMMs that `runner` runs in e4m3 (once the load-time check no
    longer needs them), so that fp8 holds less memory than half precision, not more: each becomes a
    meta tensor of its shape (a later use fails loudly instead of reading stale memory). -> bytes freed."""
    prims = fp8_primitives(runner)
    if prims is None:
        raise ValueError("release_half_weights needs an fp8 runner (dtype='float8')")
    freed = 0
    for lin in gemm_linears(prims.fast.encoder):
        w = lin.weight
        if w.device.type != "meta":
            freed += w.numel() * w.element_size()
            lin.weight = torch.nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
    return freed


def half_weights_released(encoder) -> bool:
    return any(l.qkv.weight.device.type == "meta" for l in encoder.layers)


def fp8_weight_bytes(runner) -> int:
    """Bytes of the e4m3 weights and their scales that `runner` holds (0 without fp8)."""
    prims = fp8_primitives(runner)
    if prims is None:
        return 0
    return sum(w.q.numel() * w.q.element_size() + w.scale.numel() * w.scale.element_size()
               for w in prims.weights.values())


CALIBRATION_LENGTHS = (2, 8, 16, 33, 64, 128, 257, 512)     # without a tokenizer: random ids of these lengths


def calibration_batch(model, texts=CALIBRATION_TEXTS):
    """(PackedBatch, what it holds): `texts` tokenized, or for a model without a tokenizer (random weights,
    a torchtext checkpoint without its sentencepiece model) fixed pseudo-random ids of CALIBRATION_LENGTHS."""
    if model.tokenizer is not None:
        return model.tokenize(list(texts)), f"{len(texts)} calibration texts"
    vocab = model.config.vocab_size
    lo = 1000 if vocab > 2000 else min(5, vocab - 1)           # clear of the special tokens at the start
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(lo, vocab, (n,), generator=g).tolist()
            for n in CALIBRATION_LENGTHS if n <= model.max_seq_length]
    return model.pack_ids(seqs), f"{len(seqs)} random id sequences (no tokenizer)"


@torch.inference_mode()
def accuracy_report(model, texts=CALIBRATION_TEXTS) -> dict:
    """The calibration batch through the model's fp8 runner and through the half-precision fast path
    (no graphs) on the same weights: min / mean cosine of the pooled embeddings and of the token rows,
    and for classifiers whether the argmax agrees."""
    from ..ops.attention import AttentionMeta
    from .cuda import FastEncoder

    if half_weights_released(model.task_encoder(model.task)):
        raise RuntimeError("the half-precision GEMM weights were released after the load-time check, so there "
                           "is nothing to compare fp8 with: its report is model.fp8_report "
                           "(info()['fp8_accuracy'])")
    batch, what = calibration_batch(model, texts)
    seqlens = batch.cu_seqlens.diff().tolist()
    batch = batch.to(model.device)
    meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, seqlens)
    cu = batch.cu_seqlens

    def outputs(runner):
        h = runner(batch, meta)                                                             # [T, H]
        emb = model.pooler(h, cu, normalize=False)                                          # [B, D] fp32
        return h.float(), emb, (model.head(h, cu) if model.head is not None else None)

    h8, e8, c8 = outputs(model.runner)
    h16, e16, c16 = outputs(FastEncoder(model.task_encoder(model.task)))
    cos = torch.nn.functional.cosine_similarity(e8.float(), e16.float(), dim=-1)            # [B]
    tok = torch.nn.functional.cosine_similarity(h8, h16, dim=-1)                            # [T]
    rep = {"min_cosine": round(cos.min().item(), 6), "mean_cosine": round(cos.mean().item(), 6),
           "min_token_cosine": round(tok.min().item(), 6), "calibration": what,
           "sequences": int(e8.shape[0]), "tokens": int(h8.shape[0]),
           "against": str(model.dtype).replace("torch.", ""), "threshold": MIN_COSINE}
    if c8 is not None:
        rep["argmax_agrees"] = bool((c8.argmax(-1) == c16.argmax(-1)).all())
    return rep


class Fp8AccuracyError(ValueError):
    """fp8 falls below the accuracy threshold for this model (and was not forced)."""


def guard(model, force: bool = False, texts=CALIBRATION_TEXTS) -> dict:
    """The load-time check: the accuracy report, and a refusal below MIN_COSINE unless `force`."""
    rep = accuracy_report(model, texts)
    rep["forced"] = bool(force)
    ok = rep["min_cosine"] >= MIN_COSINE
    log.info("fp8 accuracy on %s: min cosine %.6f, mean %.6f vs %s%s", rep["calibration"],
             rep["min_cosine"], rep["mean_cosine"], rep["against"], "" if ok else " (below the threshold)")
    if not ok and not force:
        raise Fp8AccuracyError(
            f"fp8 is not accurate enough for {model.source}: min embedding cosine {rep['min_cosine']:.6f} vs "
            f"{rep['against']} on {rep['calibration']}, below {MIN_COSINE}. Use dtype='float16' "
            "(or force_fp8=True / --force-fp8 to run it anyway)")
    return rep
