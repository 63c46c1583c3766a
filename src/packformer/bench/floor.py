"""The GEMM floor: the encoder's four matrix multiplies per layer (QKV, out-proj, FFN1, FFN2) and
nothing else, as `F.linear` on [T, H] with the model's own weights.

On the real (packed) token count it is the compute floor of a padding-free encoder; on the padded
count it shows what padding costs. Attention, norms, activations and host work are all left out,
so no engine can be faster than the real-count floor by more than those.

On a GPU the GEMMs replay as one CUDA graph: launched one by one from Python, a small batch's 48
GEMMs are bound by the host's launches (bert-base serve_b32 on an H200: 0.8–1.6 ms eager, 0.69–0.71 ms
as a graph), which would make the floor easy to beat and the ratios to it flattering.

On a CPU each of the four GEMMs runs in the faster of two libraries, timed at the passes' median token
count when the runner is built: torch's `F.linear` (MKL) and oneDNN on pre-packed weights (what the CPU
fast path calls). On an AMD EPYC MKL's fp32 GEMMs ran at a third to half of oneDNN's rate, so an
MKL-only floor was slower than packformer itself (benchmarks/NOTES-cpu.md); `backends` says which ran.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import Encoder
from .timing import measure

ROLES = ("qkv", "out", "ffn1", "ffn2")


class GemmFloor:
    """fp8=True: the same GEMMs in e4m3 (ops/fp8.fp8_linear: per-channel weight and per-token activation
    scales, `dtype` out), on inputs quantized once outside the timed call: the floor of `dtype="float8"`."""

    def __init__(self, encoder: Encoder, device: torch.device | str, dtype: torch.dtype, fp8: bool = False):
        self.device, self.dtype, self.fp8 = torch.device(device), dtype, fp8
        self.hidden, self.inter = encoder.config.hidden_size, encoder.config.intermediate_size

        def w(lin):
            return lin.weight.detach().to(self.device, dtype).clone(), lin.bias.detach().to(self.device, dtype).clone()

        # [(qkv, out, ffn1, ffn2) per layer], each (weight, bias)
        self.layers = [(w(l.qkv), w(l.out), w(l.ffn1), w(l.ffn2)) for l in encoder.layers]
        self.attn = self.layers[0][1][0].shape[1] if self.layers else self.hidden   # heads x head size (Qwen3: 2H)
        # CPU: the same GEMMs on oneDNN's packed weights, where this torch build runs them
        self.packed = None
        if fp8:
            from ..ops.fp8 import quantize_weight
            self.quantized = [tuple((*quantize_weight(w), b) for w, b in layer) for layer in self.layers]
        elif self.device.type == "cpu":
            from ..fast.cpu_linear import OneDnnLinear, onednn_available
            if onednn_available(dtype):
                self.packed = [tuple(OneDnnLinear(lin, dtype) for lin in (l.qkv, l.out, l.ffn1, l.ffn2))
                               for l in encoder.layers]
        gpu = "fp8" if fp8 else "cublas"
        self.backends: dict[str, str] = {r: gpu if self.device.type == "cuda" else "mkl" for r in ROLES}

    def flops(self, tokens: int) -> int:
        """Multiply-adds x 2 of one pass over `tokens` tokens."""
        per_token = sum(a[0].numel() + b[0].numel() + c[0].numel() + d[0].numel() for a, b, c, d in self.layers)
        return 2 * tokens * per_token

    def runner(self, token_counts: Sequence[int], graph: bool | None = None) -> Callable[[], torch.Tensor]:
        """A call that runs the GEMMs once per entry of `token_counts` (one entry per batch a real engine
        would run), each on a [T, H] input; inputs are made once, outside the timed call.
        graph: replay them as one CUDA graph (default: on a GPU)."""
        g = torch.Generator(device="cpu").manual_seed(0)
        xs = [(torch.randn(t, self.hidden, generator=g).to(self.device, self.dtype),
               torch.randn(t, self.attn, generator=g).to(self.device, self.dtype),
               torch.randn(t, self.inter, generator=g).to(self.device, self.dtype)) for t in token_counts if t > 0]

        calls = self._calls(xs)

        def run() -> torch.Tensor:
            out = None
            for x, xa, xi in xs:
                for qkv, o, f1, f2 in calls:
                    qkv(x)                                                # [T, (nh + 2 nkv) hd]
                    out = o(xa)                                           # [T, nh hd] -> [T, H]
                    f1(x)                                                 # [T, I] (GLU: [T, 2I])
                    out = f2(xi)                                          # [T, I] -> [T, H]
            return out

        if graph is None:
            graph = self.device.type == "cuda"
        if not graph or not xs:
            return run
        if self.device.type != "cuda":
            raise ValueError(f"a CUDA graph floor needs a CUDA device, got {self.device}")
        run()                                  # warm-up outside the capture: cuBLAS handles and workspaces
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()

        def replay() -> torch.Tensor:
            g.replay()
            return out

        return replay

    def _calls(self, xs) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        """Per layer, the four GEMMs as callables: F.linear, or on a CPU with packed weights the faster of
        F.linear and oneDNN per role, timed on the median pass (`backends` records the choice); with fp8,
        fp8_linear on the inputs' e4m3 rows."""
        if self.fp8:
            from ..ops.fp8 import fp8_linear, quantize_rows
            qx = {id(x): quantize_rows(x) for batch in xs for x in batch}       # once, outside the timed call
            out = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16

            def e4m3(wq, ws, b):
                return lambda x: fp8_linear(qx[id(x)], wq, ws, b, out_dtype=out)
            return [tuple(e4m3(*wsb) for wsb in layer) for layer in self.quantized]

        def aten(wb):
            return lambda x, w=wb[0], b=wb[1]: F.linear(x, w, b)

        mkl = [tuple(aten(wb) for wb in layer) for layer in self.layers]
        if self.packed is None or not xs:
            return mkl
        x, xa, xi = sorted(xs, key=lambda t: t[0].shape[0])[len(xs) // 2]
        use = []
        with torch.inference_mode():
            for r, inp in enumerate((x, xa, x, xi)):
                times = {name: measure(lambda: fn[r](inp), "cpu", iterations=3)[0].median_ms
                         for name, fn in (("mkl", mkl[0]), ("onednn", self.packed[0]))}
                use.append(min(times, key=times.get))
                self.backends[ROLES[r]] = use[-1]
        return [tuple(m[r] if use[r] == "mkl" else p[r] for r in range(4)) for m, p in zip(mkl, self.packed)]
