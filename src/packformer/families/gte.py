"""GTE v1.5 and mGTE (gte-base-en-v1.5, gte-large-en-v1.5, gte-multilingual-base; model_type "new"): remote
code (`NewModel` of Alibaba-NLP/new-impl's modeling.py). Recent transformers' own GteModel (model_type "gte",
renamed weights, no "ntk" rope type) is the bench peer (`to_hf_config`, `hf_keymap`): GTE's fixed NTK scaling is
its "linear" rope type on base * factor with factor ** (2 / head_dim) as the linear factor.

Post-norm BERT layers without absolute positions: word (+ token-type when type_vocab_size > 0) embeddings
and their LayerNorm; rotary on the whole head (rotate_half pairs, positions from 0), base `rope_theta`, with
rope_scaling {"type": "ntk", "factor": f} GTE's fixed NTK scaling (ops.rotary "ntk"). Attention:
`attention.qkv_proj` rows [q; k; v] and `attention.o_proj`, both with biases; `attn_ln` after it. FFN:
`mlp.up_gate_proj` (no bias) rows are [up; gate] and out = down_proj(act(gate) * up): packformer's [gate; up]
is that weight with its halves swapped, its missing bias a zero one; `mlp_ln` after it. Classification:
tanh(pooler.dense(h[CLS])) -> classifier, the model under `new.`.

Options that do not change inference: dropouts, `unpad_inputs` and `use_memory_efficient_attention` (xformers
on unpadded rows: the same function), the unused `logn_attention_clip1` (only read with logn scaling).
Refused: logn_attention_scale (a per-sequence query scale), layer_norm_type "rms_norm", absolute positions,
NTK's mixed variant (`mixed_b`), separate q/k/v projections (pack_qkv false; every released model packs them).
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule, module_rules
from ..ops.rotary import RotaryConfig
from .base import (Family, classification_labels, glu_port_keymap, hf_activation,
                   port_config_kwargs, transformers_class)

# NewConfig's defaults for keys a config.json may leave out
DEFAULTS = dict(vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", max_position_embeddings=2048, type_vocab_size=1,
                layer_norm_type="layer_norm", layer_norm_eps=1e-12, position_embedding_type="rope",
                rope_theta=10000.0, rope_scaling=None, pack_qkv=True, logn_attention_scale=False)


def _rotary(d: dict) -> RotaryConfig:
    theta, scaling = float(d["rope_theta"]), d["rope_scaling"]
    if scaling is None:
        return RotaryConfig(base=theta)
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind != "ntk" or scaling.get("mixed_b") is not None:
        raise ValueError(f"unsupported rope_scaling {scaling!r}: packformer runs GTE's fixed NTK scaling "
                         "({'type': 'ntk', 'factor': f}) or none")
    return RotaryConfig(base=theta, scaling="ntk", scaling_factor=float(scaling["factor"]))


def config_from_hf(d: dict) -> EncoderConfig:
    """NewConfig config.json -> EncoderConfig; options packformer cannot run raise a ValueError."""
    g = {**DEFAULTS, **{k: v for k, v in d.items() if k in DEFAULTS and v is not None}}
    for key, ok in (("position_embedding_type", "rope"), ("layer_norm_type", "layer_norm"),
                    ("logn_attention_scale", False), ("pack_qkv", True)):
        if g[key] != ok:
            raise ValueError(f"unsupported {key}={g[key]!r}: packformer runs GTE with {key}={ok!r}")
    num_labels, id2label = classification_labels(d)
    return EncoderConfig(
        vocab_size=g["vocab_size"], hidden_size=g["hidden_size"], num_layers=g["num_hidden_layers"],
        num_heads=g["num_attention_heads"], intermediate_size=g["intermediate_size"],
        max_position_embeddings=g["max_position_embeddings"], type_vocab_size=g["type_vocab_size"],
        layer_norm_eps=g["layer_norm_eps"], activation=hf_activation(g["hidden_act"]),
        pad_token_id=int(d.get("pad_token_id") or 0), position_offset=0, norm_first=False,
        embedding_layer_norm=True, position_embedding="none", rotary=_rotary(g), ffn_kind="glu",
        model_type="new", family="gte", num_labels=num_labels, id2label=id2label,
    )


_L = "encoder.layer.{i}."


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """NewModel keys (a NewForSequenceClassification / NewForMaskedLM checkpoint has them under `new.`,
    stripped by the loader)."""
    rules = [
        Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
        Rule.of("layers.{i}.ffn1.weight", _L + "mlp.up_gate_proj.weight", transform="swap_halves"),
        *module_rules({
            "embeddings.norm": "embeddings.LayerNorm",
            "layers.{i}.qkv": _L + "attention.qkv_proj",
            "layers.{i}.out": _L + "attention.o_proj",
            "layers.{i}.norm1": _L + "attn_ln",
            "layers.{i}.ffn2": _L + "mlp.down_proj",
            "layers.{i}.norm2": _L + "mlp_ln",
        }),
    ]
    if cfg.type_vocab_size > 0:
        rules.append(Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"))
    # the MLM head; buffers that some copies of the remote code persist
    ignore = ["lm_head.*", "embeddings.position_ids", "embeddings.rotary_emb.*"]
    if with_head:
        rules += [Rule.of("head.dense.weight", "pooler.dense.weight"), Rule.of("head.dense.bias", "pooler.dense.bias"),
                  Rule.of("head.out.weight", "classifier.weight"), Rule.of("head.out.bias", "classifier.bias")]
    else:
        ignore += ["pooler.*", "classifier.*"]
    return KeyMap(rules, ignore=ignore, absent=["layers.*.ffn1.bias"])


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers GteConfig (transformers >= 5). GTE's NTK frequencies are
    1 / ((base f)^(2i/d) f^(2/d)) (ops.rotary.rotary_inv_freq): the plain rope of base * f, each frequency
    divided by f^(2/d), which is the "linear" rope type with that factor."""
    GteConfig = transformers_class("GteConfig")

    rot, d = cfg.rotary, cfg.head_dim
    if rot is None or rot.rot_dim(d) != d or rot.interleaved:
        raise ValueError(f"no GteConfig states this model's rotary {rot!r}")
    if rot.scaling == "ntk":
        f = rot.scaling_factor
        rope = {"rope_type": "linear", "rope_theta": rot.base * f, "factor": f ** (2 / d)}
    else:
        rope = {"rope_type": "default", "rope_theta": rot.base}
    return GteConfig(**port_config_kwargs(cfg), rope_parameters=rope)


def _preset(**kw) -> EncoderConfig:
    return EncoderConfig(**{**dict(vocab_size=30528, max_position_embeddings=8192, layer_norm_eps=1e-12,
                                   activation="gelu", position_embedding="none", ffn_kind="glu", model_type="new",
                                   family="gte"), **kw})


FAMILY = Family(
    name="gte", model_types=("new",), config_from_hf=config_from_hf, keymap=keymap,
    reference="a transcription of NewModel / NewForSequenceClassification (Alibaba-NLP/new-impl modeling.py, the "
              "checkpoints' remote code) in tests/families/ref_gte.py, and transformers' GteModel",
    to_hf_config=to_hf_config,
    hf_keymap=lambda cfg, with_head: glu_port_keymap(cfg, with_head, attn_bias=True, down_bias=True),
    presets={
        "gte-base-en-v1.5": _preset(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                                    type_vocab_size=0,
                                    rotary=RotaryConfig(base=500000.0, scaling="ntk", scaling_factor=2.0)),
        "gte-large-en-v1.5": _preset(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                                     type_vocab_size=2,
                                     rotary=RotaryConfig(base=160000.0, scaling="ntk", scaling_factor=2.0)),
    },
)
