"""The model folders Infinity and FastEmbed load: written from the bench's weights, they describe the same
model (pooling, normalization, truncation) in the files those engines read."""
import json

import numpy as np
import pytest
import torch

import packformer
from packformer.bench.peer_folders import NoFolder, model_folder, shared_folder
from packformer.bench.run import load_source
from packformer.config import EncoderConfig
from packformer.heads import Pooler
from packformer.loaders.hf import load_tokenizer
from packformer.loaders.parts import ModelParts
from packformer.loading import builtin_model_dir
from packformer.model import Encoder

TEXTS = ["Hello world", "How are you!", "river " * 300]


def tiny_parts(fmt: str = "random") -> ModelParts:
    cfg = EncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    return ModelParts(config=cfg, encoder=Encoder(cfg).eval(), head=None, pooler=Pooler("cls"),
                      tokenizer=load_tokenizer(builtin_model_dir(), cfg), max_seq_length=128, source="random:tiny",
                      format=fmt)


def test_a_torch_folder_loads_back_as_the_same_model(tmp_path):
    parts = load_source(None)
    folder = model_folder(parts, tmp_path / "m", onnx=False)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 256
    again = packformer.load(folder)
    assert (again.pooler.mode, again.pooler.normalize, again.max_seq_length) == ("mean", True, 256)
    np.testing.assert_allclose(again.encode(TEXTS), packformer.load().encode(TEXTS), atol=1e-6)


def test_an_onnx_folder_holds_one_model_onnx_at_its_top_and_truncates_at_max_seq_length(tmp_path):
    pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install onnx")
    folder = model_folder(tiny_parts(), tmp_path / "m", onnx=True)
    assert [p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx")] == ["model.onnx"]
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 128
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 128
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling"]                      # this model does not normalize


def test_the_folder_is_written_once_per_run(tmp_path):
    parts = tiny_parts()
    first = shared_folder(parts, tmp_path, onnx=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert shared_folder(parts, tmp_path, onnx=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_model_without_a_transformers_tokenizer_has_no_folder(tmp_path):
    with pytest.raises(NoFolder, match="tokenizer"):
        model_folder(tiny_parts("torchtext"), tmp_path / "m", onnx=False)
    assert not (tmp_path / "m").exists()
