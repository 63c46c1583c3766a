"""Fast paths: transforms applied outside the readable model (model.py stays the reference).

`select_runner(model, fast)` returns the callable `(PackedBatch on device, AttentionMeta) -> [T, H]`
that `Model.hidden_states` uses: the CUDA path (fused kernels, graphs) or the CPU path, or the
reference encoder itself when `fast=False`.
"""
from __future__ import annotations


def select_runner(model, fast: bool | None = None):
    if fast is False:
        return model.encoder
    if model.device.type == "cuda":
        from .cuda import build_runner
    else:
        from .cpu import build_runner
    return build_runner(model)
