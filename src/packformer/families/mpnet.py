"""MPNet: BERT's post-norm layer plus a learned relative-position bias (32 T5-style buckets up to 128
tokens apart, one [32, heads] table shared by every layer, added to the scaled scores), learned absolute
positions numbered from 2 as RoBERTa's, and no token types."""
from __future__ import annotations

import dataclasses

from ..config import EncoderConfig, RelativeBuckets
from ..loaders.keymap import KeyMap, Rule, module_rules
from .base import Family, TO_HF_ACTIVATIONS, classification_labels, hf_activation
from .bert import BERT_FFN_MODULES

# transformers' MPNetEncoder.compute_position_bias always buckets with these (its num_buckets argument
# keeps its default of 32 whatever relative_attention_num_buckets says), so they are the only ones we load
BUCKETS = RelativeBuckets(num_buckets=32, max_distance=128)
# MPNetEmbeddings numbers positions after its fixed padding_idx 1 (not config.pad_token_id): 2, 3, ...
POSITION_OFFSET = 2

# what to_hf_config passes on as is; every other EncoderConfig field must keep MPNet's value
SHAPE_FIELDS = {"vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                "layer_norm_eps", "activation", "pad_token_id", "num_labels", "id2label"}

_L = "encoder.layer.{i}."
RULES = [
    Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    Rule.of("embeddings.position.weight", "embeddings.position_embeddings.weight"),
    Rule.of("relative_bias.weight", "encoder.relative_attention_bias.weight"),
    *module_rules({
        "embeddings.norm": "embeddings.LayerNorm",
        "layers.{i}.qkv": tuple(_L + f"attention.attn.{p}" for p in "qkv"),
        "layers.{i}.out": _L + "attention.attn.o",
        "layers.{i}.norm1": _L + "attention.LayerNorm",
        **BERT_FFN_MODULES,
    }),
]
# MPNetClassificationHead: dense + tanh + out_proj on the first token
HEAD_RULES = [
    Rule.of("head.dense.weight", "classifier.dense.weight"), Rule.of("head.dense.bias", "classifier.dense.bias"),
    Rule.of("head.out.weight", "classifier.out_proj.weight"), Rule.of("head.out.bias", "classifier.out_proj.bias"),
]
# the position-id buffer, MPNetModel's pooler (unused by MPNetForSequenceClassification too) and the MLM head
UNUSED = ["embeddings.position_ids", "pooler.*", "lm_head.*"]


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    return KeyMap(RULES + (HEAD_RULES if with_head else []), ignore=list(UNUSED))


def config_from_hf(d: dict) -> EncoderConfig:
    buckets = d.get("relative_attention_num_buckets", BUCKETS.num_buckets)
    if buckets != BUCKETS.num_buckets:
        raise ValueError(f"unsupported relative_attention_num_buckets {buckets!r}: transformers' MPNet buckets "
                         f"relative positions into {BUCKETS.num_buckets} whatever this says, so only "
                         f"{BUCKETS.num_buckets} is loaded")
    num_labels, id2label = classification_labels(d)
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=0,
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), activation=hf_activation(d.get("hidden_act", "gelu")),
        pad_token_id=1 if pad is None else int(pad), position_offset=POSITION_OFFSET, relative_bias=BUCKETS,
        model_type="mpnet", family="mpnet", num_labels=num_labels, id2label=id2label,
    )


def to_hf_config(cfg: EncoderConfig):
    from transformers import MPNetConfig

    # every field but the shapes must be MPNet's own (norm placement, positions, buckets, FFN, biases, ...)
    odd = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in SHAPE_FIELDS and getattr(cfg, f.name) != getattr(PRESETS["mpnet-base"], f.name)}
    if odd:
        raise ValueError(f"transformers' MPNetModel cannot reproduce this encoder: it differs from MPNet in {odd}")
    return MPNetConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                       max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
                       hidden_act=TO_HF_ACTIVATIONS[cfg.activation], pad_token_id=cfg.pad_token_id,
                       relative_attention_num_buckets=BUCKETS.num_buckets, num_labels=max(cfg.num_labels, 1))


PRESETS = {
    # microsoft/mpnet-base and sentence-transformers/all-mpnet-base-v2
    "mpnet-base": EncoderConfig(vocab_size=30527, max_position_embeddings=514, type_vocab_size=0, layer_norm_eps=1e-5,
                                pad_token_id=1, position_offset=POSITION_OFFSET, relative_bias=BUCKETS,
                                model_type="mpnet", family="mpnet"),
}

FAMILY = Family(
    name="mpnet", model_types=("mpnet",), config_from_hf=config_from_hf, keymap=keymap, to_hf_config=to_hf_config,
    presets=PRESETS, hf_pooling_layer=True,
    reference="transformers MPNetModel / MPNetForSequenceClassification; sentence-transformers "
              "all-mpnet-base-v2 (real weights)",
)
