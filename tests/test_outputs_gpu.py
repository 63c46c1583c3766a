"""Sparse and multi-vector outputs on a CUDA GPU in fp16 against the fp32 CPU reference (cosine >= 0.999
per vector): SPLADE (the MLM head runs in the model's dtype), bge-m3's three outputs, token embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import packformer
from tests.output_folders import TEXTS, bge_m3_folder, splade_folder

pytestmark = pytest.mark.gpu


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def test_splade_on_gpu_matches_cpu(tmp_path):
    folder = splade_folder(tmp_path / "splade")
    cpu = packformer.load(folder).encode(TEXTS).to_dense().numpy()
    gpu = packformer.load(folder, device="cuda", dtype="float16").encode(TEXTS).to_dense().cpu().numpy()
    assert cosines(cpu, gpu).min() >= 0.999


def test_bge_m3_on_gpu_matches_cpu(tmp_path):
    folder = bge_m3_folder(tmp_path / "m3")
    cpu = packformer.load(folder).encode_all(TEXTS)
    gpu = packformer.load(folder, device="cuda", dtype="float16").encode_all(TEXTS)
    assert cosines(cpu.dense, gpu.dense).min() >= 0.999
    for a, b in zip(cpu.colbert, gpu.colbert):
        assert a.shape == b.shape and cosines(a, b).min() >= 0.999
    for a, b in zip(cpu.sparse, gpu.sparse):
        keys = sorted(set(a) | set(b))
        assert cosines(np.array([a.get(k, 0.0) for k in keys]), np.array([b.get(k, 0.0) for k in keys])) >= 0.999


def test_token_embeddings_on_gpu_match_cpu(minilm_dir):
    cpu = packformer.load(minilm_dir).encode(TEXTS, output_value="token_embeddings")
    gpu = packformer.load(minilm_dir, device="cuda", dtype="float16").encode(TEXTS, output_value="token_embeddings")
    for a, b in zip(cpu, gpu):
        assert a.shape == b.shape and cosines(a, b).min() >= 0.999
