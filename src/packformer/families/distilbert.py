"""DistilBERT: BERT's post-norm layer under its own names, no token types, positions from 0.

The position table is learned or, with `sinusoidal_pos_embds`, a fixed sinusoid; transformers keeps
both in one `nn.Embedding`, saves both and loads the saved table in both cases, so both are a learned
table here (a checkpoint without it is an error, as for any missing key). The head is
`pre_classifier` -> ReLU -> `classifier` on the first token. LayerNorm eps is 1e-12 (fixed in
transformers, not a config key)."""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule, module_rules
from .base import Family, TO_HF_ACTIVATIONS, classification_labels, hf_activation

EPS = 1e-12
POSITIONS = "embeddings.position_embeddings.weight"

_L = "transformer.layer.{i}."
ENCODER_RULES = [
    Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    Rule.of("embeddings.position.weight", POSITIONS),
    *module_rules({
        "embeddings.norm": "embeddings.LayerNorm",
        "layers.{i}.qkv": tuple(_L + f"attention.{p}_lin" for p in "qkv"),
        "layers.{i}.out": _L + "attention.out_lin",
        "layers.{i}.norm1": _L + "sa_layer_norm",
        "layers.{i}.ffn1": _L + "ffn.lin1",
        "layers.{i}.ffn2": _L + "ffn.lin2",
        "layers.{i}.norm2": _L + "output_layer_norm",
    }),
]
HEAD_RULES = [
    Rule.of("head.dense.weight", "pre_classifier.weight"), Rule.of("head.dense.bias", "pre_classifier.bias"),
    Rule.of("head.out.weight", "classifier.weight"), Rule.of("head.out.bias", "classifier.bias"),
]
# the position-id buffer of older checkpoints and DistilBertForMaskedLM's head
KNOWN_UNUSED = ["embeddings.position_ids", "vocab_transform.*", "vocab_layer_norm.*", "vocab_projector.*"]


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    return KeyMap(ENCODER_RULES + (HEAD_RULES if with_head else []), ignore=list(KNOWN_UNUSED))


def config_from_hf(d: dict) -> EncoderConfig:
    num_labels, id2label = classification_labels(d)
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=d["vocab_size"], hidden_size=d.get("dim", 768), num_layers=d.get("n_layers", 6),
        num_heads=d.get("n_heads", 12), intermediate_size=d.get("hidden_dim", 3072),
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=0, layer_norm_eps=EPS,
        activation=hf_activation(d.get("activation", "gelu"), key="activation"),
        pad_token_id=int(pad) if pad is not None else 0, position_offset=0,
        model_type="distilbert", family="distilbert", num_labels=num_labels, id2label=id2label,
    )


# what transformers' DistilBertModel can express (everything else in EncoderConfig is fixed there)
_HF_LAYOUT = dict(norm_first=False, final_layer_norm=False, embedding_layer_norm=True, position_embedding="absolute",
                  position_offset=0, type_vocab_size=0, layer_norm_eps=EPS, rotary=None, relative_bias=None,
                  local_window=0, ffn_kind="mlp", linear_bias=True, norm_bias=True)


def to_hf_config(cfg: EncoderConfig):
    from transformers import DistilBertConfig

    odd = {k: getattr(cfg, k) for k, v in _HF_LAYOUT.items() if getattr(cfg, k) != v}
    if odd:
        raise ValueError(f"transformers' DistilBERT is post-norm with an embedding LayerNorm, positions from 0, no "
                         f"token types and eps {EPS}; this model differs in {odd}")
    return DistilBertConfig(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_layers,
                            n_heads=cfg.num_heads, hidden_dim=cfg.intermediate_size,
                            max_position_embeddings=cfg.max_position_embeddings,
                            activation=TO_HF_ACTIVATIONS[cfg.activation], pad_token_id=cfg.pad_token_id,
                            num_labels=max(cfg.num_labels, 1))


FAMILY = Family(
    name="distilbert", model_types=("distilbert",), config_from_hf=config_from_hf, keymap=keymap,
    to_hf_config=to_hf_config, hf_head_keys=("pre_classifier.", "classifier."), head_act="relu",
    reference="transformers DistilBertModel / DistilBertForSequenceClassification (learned and sinusoidal "
              "position tables)",
    presets={"distilbert-base": EncoderConfig(vocab_size=30522, hidden_size=768, num_layers=6, num_heads=12,
                                              intermediate_size=3072, max_position_embeddings=512,
                                              type_vocab_size=0, layer_norm_eps=EPS, model_type="distilbert",
                                              family="distilbert")},
)
