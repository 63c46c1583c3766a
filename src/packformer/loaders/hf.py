"""Hugging Face model folders: BERT, RoBERTa, XLM-R (and their *ForSequenceClassification heads)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import EncoderConfig
from ..heads import ClassificationHead, Pooler
from ..model import Encoder
from ..tokenize import HFTokenizer, SentencePieceTokenizer
from .keymap import CheckpointError, KeyMap, Rule, rename_legacy_layernorm, strip_prefix
from .parts import ModelParts, param_view

log = logging.getLogger(__name__)

BERT_LIKE = ("bert",)
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

_L = "encoder.layer.{i}."
ENCODER_RULES = [
    Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    Rule.of("embeddings.position.weight", "embeddings.position_embeddings.weight"),
    Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
    Rule.of("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
    Rule.of("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
    Rule.of("layers.{i}.qkv.weight", *(_L + f"attention.self.{p}.weight" for p in ("query", "key", "value"))),
    Rule.of("layers.{i}.qkv.bias", *(_L + f"attention.self.{p}.bias" for p in ("query", "key", "value"))),
    Rule.of("layers.{i}.out.weight", _L + "attention.output.dense.weight"),
    Rule.of("layers.{i}.out.bias", _L + "attention.output.dense.bias"),
    Rule.of("layers.{i}.norm1.weight", _L + "attention.output.LayerNorm.weight"),
    Rule.of("layers.{i}.norm1.bias", _L + "attention.output.LayerNorm.bias"),
    Rule.of("layers.{i}.ffn1.weight", _L + "intermediate.dense.weight"),
    Rule.of("layers.{i}.ffn1.bias", _L + "intermediate.dense.bias"),
    Rule.of("layers.{i}.ffn2.weight", _L + "output.dense.weight"),
    Rule.of("layers.{i}.ffn2.bias", _L + "output.dense.bias"),
    Rule.of("layers.{i}.norm2.weight", _L + "output.LayerNorm.weight"),
    Rule.of("layers.{i}.norm2.bias", _L + "output.LayerNorm.bias"),
]
BERT_HEAD_RULES = [
    Rule.of("head.dense.weight", "pooler.dense.weight"), Rule.of("head.dense.bias", "pooler.dense.bias"),
    Rule.of("head.out.weight", "classifier.weight"), Rule.of("head.out.bias", "classifier.bias"),
]
ROBERTA_HEAD_RULES = [
    Rule.of("head.dense.weight", "classifier.dense.weight"), Rule.of("head.dense.bias", "classifier.dense.bias"),
    Rule.of("head.out.weight", "classifier.out_proj.weight"), Rule.of("head.out.bias", "classifier.out_proj.bias"),
]
# Buffers and pre-training heads that an encoder checkpoint may carry and that inference does not use.
KNOWN_UNUSED = ["embeddings.position_ids", "embeddings.token_type_ids", "cls.*", "lm_head.*"]


def hf_keymap(model_type: str, with_head: bool) -> KeyMap:
    rules = list(ENCODER_RULES)
    ignore = list(KNOWN_UNUSED)
    if with_head:
        rules += BERT_HEAD_RULES if model_type in BERT_LIKE else ROBERTA_HEAD_RULES
    else:
        ignore.append("pooler.*")
    # RoBERTa-family checkpoints saved with type_vocab_size=1 still carry the table: keep it optional
    return KeyMap(rules, ignore=ignore, optional=["embeddings.token_type.weight"])


def config_from_hf(d: dict) -> EncoderConfig:
    mt = d.get("model_type", "")
    if mt not in BERT_LIKE + ROBERTA_LIKE:
        raise ValueError(f"unsupported model_type {mt!r} in config.json; packformer loads "
                         f"{', '.join(BERT_LIKE + ROBERTA_LIKE)}")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {d['position_embedding_type']!r}: only 'absolute'")
    act = d.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
    archs = d.get("architectures") or []
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    id2label = d.get("id2label") or {}
    num_labels = (len(id2label) or d.get("num_labels", 2)) if is_cls else 0
    if is_cls and d.get("problem_type") not in (None, "single_label_classification", "multi_label_classification",
                                                "regression"):
        raise ValueError(f"unsupported problem_type {d.get('problem_type')!r}")
    pad = int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0)
    return EncoderConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), activation=ACTIVATIONS[act], pad_token_id=pad,
        position_offset=pad + 1 if mt in ROBERTA_LIKE else 0, model_type=mt, num_labels=num_labels,
        id2label=id2label if is_cls else {},
    )


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (single or sharded), else pytorch_model.bin loaded with weights_only=True."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin; found {sorted(p.name for p in folder.iterdir())}")


def load_tokenizer(folder: Path, cfg: EncoderConfig):
    if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
        lower = True
        tc = folder / "tokenizer_config.json"
        if tc.exists():
            lower = bool(json.loads(tc.read_text()).get("do_lower_case", True))
        return HFTokenizer.from_folder(folder, pad_id=cfg.pad_token_id, position_offset=cfg.position_offset,
                                       lowercase=lower)
    if (folder / "sentencepiece.bpe.model").exists():
        return SentencePieceTokenizer(folder / "sentencepiece.bpe.model")
    return None


def load_hf(folder: str | Path, with_tokenizer: bool = True) -> ModelParts:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    cfg = config_from_hf(json.loads(cfg_path.read_text()))
    state = rename_legacy_layernorm(read_state_dict(folder))
    state, _ = strip_prefix(state, "embeddings.word_embeddings.weight")
    if "embeddings.token_type_embeddings.weight" not in state:
        cfg = cfg.replace(type_vocab_size=0)
    encoder = Encoder(cfg)
    head = ClassificationHead(cfg.hidden_size, cfg.num_labels, act="tanh") if cfg.num_labels else None
    keymap = hf_keymap(cfg.model_type, with_head=head is not None)
    view = param_view(encoder, head)
    params = keymap.convert(state, view, cfg.num_layers, what=f"checkpoint {folder}")
    view.load_state_dict(params, strict=False)
    tok = load_tokenizer(folder, cfg) if with_tokenizer else None
    max_len = cfg.max_tokens_per_sequence
    return ModelParts(config=cfg, encoder=encoder, head=head, pooler=Pooler("mean", normalize=False),
                      tokenizer=tok, max_seq_length=max_len, source=str(folder), format="huggingface")


__all__ = ["load_hf", "config_from_hf", "hf_keymap", "read_state_dict", "CheckpointError"]
