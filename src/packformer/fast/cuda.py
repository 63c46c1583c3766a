"""CUDA fast path (issue 5). Until it lands, the reference encoder runs."""
from __future__ import annotations


def build_runner(model):
    return model.encoder
