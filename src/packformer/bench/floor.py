"""The GEMM floor: the encoder's four matrix multiplies per layer (QKV, out-proj, FFN1, FFN2) and
nothing else, as `F.linear` on [T, H] with the model's own weights.

On the real (packed) token count it is the compute floor of a padding-free encoder; on the padded
count it shows what padding costs. Attention, norms, activations and host work are all left out,
so no engine can be faster than the real-count floor by more than those.

On a GPU the GEMMs replay as one CUDA graph: launched one by one from Python, a small batch's 48
GEMMs are bound by the host's launches (bert-base serve_b32 on an H200: 0.8–1.6 ms eager, 0.69–0.71 ms
as a graph), which would make the floor easy to beat and the ratios to it flattering.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import Encoder


class GemmFloor:
    def __init__(self, encoder: Encoder, device: torch.device | str, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.hidden, self.inter = encoder.config.hidden_size, encoder.config.intermediate_size

        def w(lin):
            return lin.weight.detach().to(self.device, dtype).clone(), lin.bias.detach().to(self.device, dtype).clone()

        # [(qkv, out, ffn1, ffn2) per layer], each (weight, bias)
        self.layers = [(w(l.qkv), w(l.out), w(l.ffn1), w(l.ffn2)) for l in encoder.layers]
        self.attn = self.layers[0][1][0].shape[1] if self.layers else self.hidden   # heads x head size (Qwen3: 2H)

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

        def run() -> torch.Tensor:
            out = None
            for x, xa, xi in xs:
                for (wq, bq), (wo, bo), (w1, b1), (w2, b2) in self.layers:
                    F.linear(x, wq, bq)                                   # [T, (nh + 2 nkv) hd]
                    out = F.linear(xa, wo, bo)                            # [T, nh hd] -> [T, H]
                    F.linear(x, w1, b1)                                   # [T, I] (GLU: [T, 2I])
                    out = F.linear(xi, w2, b2)                            # [T, I] -> [T, H]
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
