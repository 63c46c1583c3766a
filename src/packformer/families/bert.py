"""BERT, RoBERTa, XLM-R and CamemBERT: post-norm, learned absolute positions, token types (BERT)."""
from __future__ import annotations

from ..config import PRESETS, EncoderConfig
from ..loaders.keymap import KeyMap, Rule, module_rules
from .base import Family, TO_HF_ACTIVATIONS, classification_labels, hf_activation

BERT_LIKE = ("bert",)
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")

_L = "encoder.layer.{i}."
# the feed-forward half of a BERT-layout layer, shared by the families that keep BERT's key names there
BERT_FFN_MODULES = {"layers.{i}.ffn1": _L + "intermediate.dense", "layers.{i}.ffn2": _L + "output.dense",
                    "layers.{i}.norm2": _L + "output.LayerNorm"}
ENCODER_RULES = [
    Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    Rule.of("embeddings.position.weight", "embeddings.position_embeddings.weight"),
    Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
    *module_rules({
        "embeddings.norm": "embeddings.LayerNorm",
        "layers.{i}.qkv": tuple(_L + f"attention.self.{p}" for p in ("query", "key", "value")),
        "layers.{i}.out": _L + "attention.output.dense",
        "layers.{i}.norm1": _L + "attention.output.LayerNorm",
        **BERT_FFN_MODULES,
    }),
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
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {d['position_embedding_type']!r}: only 'absolute'")
    num_labels, id2label = classification_labels(d)
    pad = int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0)
    return EncoderConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), activation=hf_activation(d.get("hidden_act", "gelu")),
        pad_token_id=pad, position_offset=pad + 1 if mt in ROBERTA_LIKE else 0, model_type=mt,
        num_labels=num_labels, id2label=id2label,
    )


def to_hf_config(cfg: EncoderConfig):
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig

    if cfg.norm_first or cfg.final_layer_norm or not cfg.embedding_layer_norm:
        raise ValueError(f"a transformers peer needs a post-norm BERT-family encoder with an embedding LayerNorm; "
                         f"this model has norm_first={cfg.norm_first}, final_layer_norm={cfg.final_layer_norm}, "
                         f"embedding_layer_norm={cfg.embedding_layer_norm}")
    if cfg.model_type in BERT_LIKE:
        cls, offset = BertConfig, 0
    else:
        cls, offset = (XLMRobertaConfig if cfg.model_type == "xlm-roberta" else RobertaConfig), cfg.pad_token_id + 1
    if cfg.position_offset != offset:
        raise ValueError(f"model_type {cfg.model_type} numbers positions from {offset}, this model from "
                         f"{cfg.position_offset}: transformers cannot reproduce it")
    return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
               max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=max(cfg.type_vocab_size, 1),
               layer_norm_eps=cfg.layer_norm_eps, hidden_act=TO_HF_ACTIVATIONS[cfg.activation],
               pad_token_id=cfg.pad_token_id, num_labels=max(cfg.num_labels, 1))


FAMILY = Family(
    name="bert", model_types=BERT_LIKE + ROBERTA_LIKE, config_from_hf=config_from_hf,
    keymap=lambda cfg, with_head: hf_keymap(cfg.model_type, with_head), to_hf_config=to_hf_config,
    hf_pooling_layer=True,
    # XLM-R large with 8,194 positions, i.e. 8,192-token inputs (bge-m3, snowflake-arctic-embed-l-v2.0)
    presets={"xlmr-large-8194": PRESETS["xlmr-large"].replace(max_position_embeddings=8194)},
    reference="transformers BertModel / RobertaModel / XLMRobertaModel (+ ForSequenceClassification); "
              "sentence-transformers all-MiniLM-L6-v2 (real weights)",
)
