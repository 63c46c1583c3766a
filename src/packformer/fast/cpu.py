"""CPU fast path (issue 6). Until it lands, the reference encoder runs."""
from __future__ import annotations


def build_runner(model):
    return model.encoder
