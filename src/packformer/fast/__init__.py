"""Fast paths: transforms applied outside the readable model (model.py stays the reference).

`select_runner(model, fast)` returns the callable `(PackedBatch on device, AttentionMeta) -> [T, H]`
that `Model.hidden_states` uses: the CUDA path (fused kernels, graphs) or the CPU path, or the
reference encoder itself when `fast=False`.
"""
from __future__ import annotations


def select_runner(model, fast: bool | None = None):
    if fast is False:
        if model.device.type == "cpu" and getattr(model, "threads", None) is not None:
            from .cpu_threads import apply_threads
            apply_threads(model.threads)      # the thread count is a property of the process, not the path
        return model.encoder
    if model.device.type == "cuda":
        from .cuda import build_runner
    else:
        from .cpu import build_runner
    return build_runner(model)


def describe_runner(runner, encoder) -> dict:
    """What runs the encoder, for Model.info(): the reference, or a fast path and its settings."""
    if runner is encoder:
        return {"path": "reference"}
    d = {"path": type(runner).__name__}
    if hasattr(runner, "describe"):
        d.update(runner.describe())
    return d
