"""Qwen3 used as an encoder (transformers Qwen3Model / Qwen3ForCausalLM, model_type "qwen3"): Qwen3-Embedding
(last-token pooling over causal attention) and the body of Qwen3-Reranker (decoder_rerank.py).

Pre-norm decoder layers with RMSNorm (w * x / rms), a final norm, no absolute positions and no token types;
causal attention inside each packed sequence, grouped-query attention (num_key_value_heads), a head size
of its own (`head_dim`: 128 for hidden 1024 and 16 heads), an RMSNorm over each q and k head before rotary
(rotate-half layout, base `rope_theta` 1e6), a SwiGLU FFN (gate_proj, up_proj -> packformer's [gate; up]),
no biases unless `attention_bias` (then on q/k/v/o only).

Options that do not change inference: dropout, `use_cache`, `max_window_layers` (unused without sliding
windows), `tie_word_embeddings` and `lm_head.weight` (the LM head: the embedding model never reads it; the
reranker reads two of its rows itself), initialisation settings.
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule
from ..ops.rotary import RotaryConfig
from .base import Family, TO_HF_ACTIVATIONS, hf_activation


def rope_base(d: dict, default: float = 1_000_000.0) -> float:
    """The rotary base of a config.json: transformers 5's `rope_parameters` or 4.x `rope_theta`; only
    default RoPE (no scaling)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r} (rope_parameters / rope_scaling): packformer runs "
                         "default RoPE")
    return float(params.get("rope_theta", d.get("rope_theta", default)))


def config_from_hf(d: dict) -> EncoderConfig:
    """Qwen3 config.json -> EncoderConfig; options packformer cannot run raise a ValueError."""
    if d.get("use_sliding_window", False):
        raise ValueError("unsupported use_sliding_window=True: packformer runs Qwen3 with full causal attention")
    types = d.get("layer_types")
    if types is not None and set(types) != {"full_attention"}:
        raise ValueError(f"unsupported layer_types {sorted(set(types))!r}: only 'full_attention'")
    archs = d.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"unsupported architectures {archs!r}: packformer loads Qwen3Model / Qwen3ForCausalLM")
    heads = d.get("num_attention_heads", 16)
    hidden = d.get("hidden_size", 1024)
    pad = d.get("pad_token_id")
    if pad is None:
        pad = d.get("eos_token_id")
    if isinstance(pad, list):
        pad = pad[0]
    return EncoderConfig(
        vocab_size=d.get("vocab_size", 151936), hidden_size=hidden, num_layers=d.get("num_hidden_layers", 28),
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_size=d.get("head_dim") or hidden // heads, intermediate_size=d.get("intermediate_size", 3072),
        max_position_embeddings=d.get("max_position_embeddings", 32768), type_vocab_size=0,
        layer_norm_eps=d.get("rms_norm_eps", 1e-6), activation=hf_activation(d.get("hidden_act", "silu")),
        pad_token_id=0 if pad is None else int(pad), norm_first=True, embedding_layer_norm=False,
        final_layer_norm=True, position_embedding="none", rotary=RotaryConfig(base=rope_base(d)),
        ffn_kind="glu", linear_bias=bool(d.get("attention_bias", False)), norm_bias=False, norm_kind="rms",
        qk_norm=True, causal=True, model_type="qwen3", family="qwen3")


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """Qwen3Model keys (a Qwen3ForCausalLM checkpoint has them under `model.`, stripped by the loader)."""
    L, A = "layers.{i}.", "layers.{i}.self_attn."
    rules = [Rule.of("embeddings.word.weight", "embed_tokens.weight"), Rule.of("final_norm.weight", "norm.weight"),
             Rule.of(L + "qkv.weight", A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"),
             Rule.of(L + "out.weight", A + "o_proj.weight"),
             Rule.of(L + "q_norm.weight", A + "q_norm.weight"), Rule.of(L + "k_norm.weight", A + "k_norm.weight"),
             Rule.of(L + "ffn1.weight", L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
             Rule.of(L + "ffn2.weight", L + "mlp.down_proj.weight"),
             Rule.of(L + "norm1.weight", L + "input_layernorm.weight"),
             Rule.of(L + "norm2.weight", L + "post_attention_layernorm.weight")]
    absent = ["layers.*.ffn1.bias", "layers.*.ffn2.bias"]
    if cfg.linear_bias:
        rules += [Rule.of(L + "qkv.bias", A + "q_proj.bias", A + "k_proj.bias", A + "v_proj.bias"),
                  Rule.of(L + "out.bias", A + "o_proj.bias")]
    else:
        absent += ["layers.*.qkv.bias", "layers.*.out.bias"]
    return KeyMap(rules, ignore=["lm_head.*", "score.*"], absent=absent)


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers Qwen3Config."""
    from transformers import Qwen3Config

    want = dict(norm_first=True, causal=True, norm_kind="rms", qk_norm=True, ffn_kind="glu", sandwich_norm=False,
                final_layer_norm=True, embedding_layer_norm=False, position_embedding="none", type_vocab_size=0,
                local_window=0, embedding_scale=1.0, attention_scale=0.0, relative_bias=None, disentangled=None,
                adapters=None)
    off = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if off or cfg.rotary is None or cfg.rotary != RotaryConfig(base=cfg.rotary.base):
        raise ValueError(f"no Qwen3Config states this model: {off or repr(cfg.rotary)}")
    return Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act=TO_HF_ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.layer_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary.base}, attention_bias=cfg.linear_bias,
        tie_word_embeddings=True, pad_token_id=cfg.pad_token_id)


def _preset(**shape) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=151669, max_position_embeddings=32768, type_vocab_size=0, layer_norm_eps=1e-6,
        activation="silu", pad_token_id=151643, norm_first=True, embedding_layer_norm=False, final_layer_norm=True,
        position_embedding="none", rotary=RotaryConfig(base=1_000_000.0), ffn_kind="glu", linear_bias=False,
        norm_bias=False, norm_kind="rms", qk_norm=True, causal=True, head_size=128, model_type="qwen3",
        family="qwen3", **shape)


FAMILY = Family(
    name="qwen3", model_types=("qwen3",), config_from_hf=config_from_hf, keymap=keymap, to_hf_config=to_hf_config,
    anchor="embed_tokens.weight",
    presets={
        "qwen3-embedding-0.6b": _preset(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                                        intermediate_size=3072),
    },
    embedding_pooling=lambda d: ("last", True),
    gpu_dtype="bfloat16",                # trained in bf16: fp16 can overflow its activations
    reference="transformers Qwen3Model (sdpa), sentence-transformers (last-token pooling), Qwen3ForCausalLM "
              "yes/no logits for the reranker",
)
