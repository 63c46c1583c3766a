"""FastEmbed as a peer: `TextEmbedding.embed` (ONNX Runtime on CPU) on the bench's own ONNX export of the
weights, registered as a custom model and loaded from a local folder.

What it takes, on fastembed 0.9:
- a local ONNX model is registered first (`TextEmbedding.add_custom_model`: pooling, normalization,
  dimension, file name) and then opened with `specific_model_path`, which skips every download; the
  registry is per process and refuses a name twice, so each build registers a fresh name.
- it truncates at tokenizer_config.json's model_max_length (512 for all-MiniLM-L6-v2): the folder
  says max_seq_length (bench/peer_folders.py).
- pooling is CLS or MEAN (no max); normalization follows the model.
- batches are taken in input order (no length sorting), `batch_size` texts each, padded to the longest.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import torch

from .peer_folders import NoFolder, shared_folder
from .peers import Engine, NotApplicable, PeerContext, TextInputs


class FastEmbedEngine(Engine):
    def __init__(self, model, notes: str):
        self.model, self.notes, self.name, self.dtype = model, notes, "fastembed", torch.float32

    def prepare(self, inputs):
        if not isinstance(inputs, TextInputs):
            raise NotApplicable("fastembed embeds texts: use a text workload (texts_1500, texts_20000) or --texts")
        texts, bs = inputs.texts, inputs.batch_size
        return lambda: np.stack(list(self.model.embed(texts, batch_size=bs)))

    def result(self, raw, inputs):
        return torch.from_numpy(raw).float()

    def close(self):
        self.model = None


def build_fastembed(ctx: PeerContext) -> Engine:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    parts = ctx.parts
    pooling = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS}.get(parts.pooler.mode)
    if pooling is None:
        raise NotApplicable(f"fastembed pools by mean or cls only; this model pools by {parts.pooler.mode}")
    try:
        folder = shared_folder(parts, ctx.workdir, onnx=True)
    except NoFolder as e:
        raise NotApplicable(f"fastembed {e}") from None
    name = f"packformer-bench/model-{uuid.uuid4().hex[:8]}"
    TextEmbedding.add_custom_model(model=name, pooling=pooling, normalization=parts.pooler.normalize,
                                   sources=ModelSource(hf=name), dim=parts.config.hidden_size, model_file="model.onnx")
    model = TextEmbedding(name, cache_dir=str(ctx.workdir / "fastembed_cache"), threads=ctx.threads,
                          specific_model_path=str(folder), local_files_only=True)
    return FastEmbedEngine(model, f"fastembed TextEmbedding.embed(texts, batch_size=...), bench's ONNX export, "
                                  f"{parts.pooler.mode} pooling, {ctx.threads} threads")
