"""What a model family is to packformer: a config mapping and a key map (plus presets and a head).

A family adds no control flow: `config_from_hf` states its architecture as EncoderConfig fields, the
key map names its checkpoint keys, and the one layer dataflow (dataflow.py) runs it on every backend.
`to_hf_config` is the inverse mapping, so tests and benchmarks can build the transformers model of the
family from our own (random) weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import EncoderConfig
from ..heads import ClassificationHead
from ..loaders.keymap import KeyMap, Rule

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu", "gelu_python": "gelu"}
TO_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def transformers_class(name: str):
    """`transformers.<name>`, or a ValueError naming the installed version that lacks it (the ports of
    remote-code families are recent: GteModel is not in transformers 5.17)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no {name}")
    return cls


def port_config_kwargs(cfg: EncoderConfig) -> dict[str, Any]:
    """The config fields that transformers' ports of remote-code families (GteConfig, NomicBertConfig,
    JinaEmbeddingsV3Config) name alike; each adds its rope parameters."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                hidden_act=TO_HF_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_position_embeddings,
                type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.layer_norm_eps,
                pad_token_id=cfg.pad_token_id)


def glu_port_keymap(cfg: EncoderConfig, with_head: bool, attn_bias: bool, down_bias: bool) -> KeyMap:
    """The state-dict names of transformers' own ports of remote-code GLU encoders (GteModel,
    NomicBertModel), for bench.convert.to_hf: q/k/v/o apart under self_attn, mlp gate/up/down (packformer's
    ffn1 rows are [gate; up]), post_attention / post_mlp LayerNorms. Bare encoders only."""
    if with_head:
        raise ValueError(f"no transformers classification model of the {cfg.family} family is built here")
    L = "layers.{i}."
    rules = [Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
             Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight")]
    for p in ("weight", "bias"):
        rules += [Rule.of(f"embeddings.norm.{p}", f"embeddings.LayerNorm.{p}"),
                  Rule.of(f"layers.{{i}}.norm1.{p}", f"{L}post_attention_layernorm.{p}"),
                  Rule.of(f"layers.{{i}}.norm2.{p}", f"{L}post_mlp_layernorm.{p}")]
    for p in ("weight", "bias") if attn_bias else ("weight",):
        rules += [Rule.of(f"layers.{{i}}.qkv.{p}", *(f"{L}self_attn.{x}_proj.{p}" for x in "qkv")),
                  Rule.of(f"layers.{{i}}.out.{p}", f"{L}self_attn.o_proj.{p}")]
    rules += [Rule.of("layers.{i}.ffn1.weight", f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight")]
    rules += [Rule.of(f"layers.{{i}}.ffn2.{p}", f"{L}mlp.down_proj.{p}")
              for p in (("weight", "bias") if down_bias else ("weight",))]
    return KeyMap(rules)


def hf_activation(name: str, key: str = "hidden_act") -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported {key} {name!r}; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def classification_labels(d: dict) -> tuple[int, dict]:
    """(num_labels, id2label) of a *ForSequenceClassification config.json; (0, {}) for a bare encoder."""
    archs = d.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return 0, {}
    if d.get("problem_type") not in (None, "single_label_classification", "multi_label_classification", "regression"):
        raise ValueError(f"unsupported problem_type {d.get('problem_type')!r}")
    id2label = d.get("id2label") or {}
    return (len(id2label) or d.get("num_labels", 2)), id2label


@dataclass(frozen=True)
class Family:
    name: str                                          # what `packformer info` and /info report
    model_types: tuple[str, ...]                       # config.json model_type values it loads
    config_from_hf: Callable[[dict], EncoderConfig]
    keymap: Callable[[EncoderConfig, bool], KeyMap]    # (config, with classification head) -> KeyMap
    reference: str                                     # what its tests compare against
    to_hf_config: Callable[[EncoderConfig], Any] | None = None   # -> a transformers PretrainedConfig
    anchor: str = "embeddings.word_embeddings.weight"  # a key whose prefix is the checkpoint's model prefix
    presets: dict[str, EncoderConfig] = field(default_factory=dict)
    # a family that shares a model_type with another (Jina v3 is "xlm-roberta" with rotary and LoRA) claims
    # its configs by this predicate, asked before the model_type lookup
    claims: Callable[[dict], bool] | None = None
    hf_pooling_layer: bool = False                     # the transformers base model takes add_pooling_layer
    hf_head_keys: tuple[str, ...] = ("classifier.",)   # *ForSequenceClassification keys outside the base model
    head_act: str = "tanh"                             # the classification head (heads.ClassificationHead)
    head_pooling: str = "cls"
    head_norm: bool = False
    # the transformers model's own state-dict names, where they differ from the checkpoint names `keymap`
    # reads (bench.convert.to_hf); None: `keymap` serves both
    hf_keymap: Callable[[EncoderConfig, bool], KeyMap] | None = None
    # (pooling mode, normalize) of a plain config.json folder, where the family's own encode() is not mean
    # pooling without normalization (Jina v3 normalizes); None: ("mean", False)
    embedding_pooling: Callable[[dict], tuple[str, bool]] | None = None
    # the dtype on CUDA when load() is given none: fp16 for the encoders; bf16 for decoder families trained
    # in bf16, whose activations can leave fp16's range (Qwen3, Gemma 3)
    gpu_dtype: str = "float16"

    def make_head(self, cfg: EncoderConfig) -> ClassificationHead | None:
        if not cfg.num_labels:
            return None
        head = ClassificationHead(cfg.hidden_size, cfg.num_labels, act=self.head_act,
                                  pooling=cfg.head_pooling or self.head_pooling,
                                  norm_eps=cfg.layer_norm_eps if self.head_norm else None, norm_bias=cfg.norm_bias)
        if not cfg.head_bias:     # a head without a dense bias keeps a zero one, as the encoder's Linears do
            torch.nn.init.zeros_(head.dense.bias)
        return head
