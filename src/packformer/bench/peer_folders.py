"""Model folders for the peers that load a model by path (Infinity, FastEmbed), written from the weights the
bench runs, so that they compute what packformer computes and nothing is ever downloaded.

A folder holds config.json, the tokenizer (tokenizer.json included, truncating at the model's
max_seq_length), the sentence-transformers modules (Pooling with the model's own mode, Normalize when
the model normalizes) and either model.safetensors (torch engines) or model.onnx at the top (ONNX
engines: the bench's own export, bench/onnx_export.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..loaders.parts import ModelParts
from . import convert

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentencepiece.bpe.model", "merges.txt", "vocab.json")


class NoFolder(Exception):
    """The model cannot be written as a folder these peers read (the message says why)."""


def tokenizer_source(parts: ModelParts) -> Path:
    """The folder holding the model's transformers tokenizer: the model's own (a sentence-transformers
    folder's Transformer module), or the built-in one for random weights of its vocabulary size."""
    if parts.format == "sentence-transformers":
        modules = json.loads((Path(parts.source) / "modules.json").read_text())
        return Path(parts.source) / modules[0].get("path", "")
    if parts.format == "huggingface":
        return Path(parts.source)
    if parts.format == "random" and parts.tokenizer is not None and parts.config.vocab_size == 30522:
        from ..loading import builtin_model_dir
        return builtin_model_dir()
    raise NoFolder(f"needs a model folder with a transformers tokenizer; {parts.source} ({parts.format}) has none")


def write_tokenizer(parts: ModelParts, folder: Path) -> None:
    """Copy the tokenizer and make sure tokenizer.json exists (FastEmbed reads only that one) and that
    every reader truncates at max_seq_length, not at the position table's 512."""
    src = tokenizer_source(parts)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    if not (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tcfg["model_max_length"] = parts.max_seq_length
    tcfg.pop("max_length", None)
    cfg_path.write_text(json.dumps(tcfg, indent=1))


def write_modules(parts: ModelParts, folder: Path) -> None:
    """sentence-transformers' modules.json, Pooling and sentence_bert_config.json for this model."""
    mode = parts.pooler.mode
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if parts.pooler.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=1))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": parts.config.hidden_size, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=1))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": parts.max_seq_length,
                                                                  "do_lower_case": False}))


def shared_folder(parts: ModelParts, workdir: Path, onnx: bool) -> Path:
    """`model_folder` under the run's scratch folder, written once per run and shared by the peers that
    read the same format (the ONNX export takes seconds)."""
    folder = workdir / ("peer_model_onnx" if onnx else "peer_model")
    if (folder / "modules.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)        # a write cut short by an error
    return model_folder(parts, folder, onnx)


def model_folder(parts: ModelParts, folder: Path, onnx: bool) -> Path:
    """Write `parts` as a sentence-transformers folder at `folder` (created; must not exist): weights as
    model.safetensors, or as model.onnx when `onnx` is set. Returns `folder`."""
    tokenizer_source(parts)                          # fail before any work when there is no tokenizer
    folder.mkdir(parents=True)
    if onnx:
        from .onnx_export import export
        cfg = convert.hf_config(parts.config)
        cfg.max_position_embeddings = parts.max_seq_length   # Infinity's ONNX engine truncates there
        cfg.save_pretrained(str(folder))
        export(parts.encoder, folder / "model.onnx")
    else:
        convert.to_hf(parts.encoder).save_pretrained(str(folder))
    write_tokenizer(parts, folder)
    write_modules(parts, folder)
    return folder
