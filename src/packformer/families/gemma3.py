"""Gemma 3 text layers used as an encoder (transformers Gemma3TextModel, model_type "gemma3_text"):
EmbeddingGemma (bidirectional attention, mean pooling, two Dense layers in its sentence-transformers folder).

Pre-norm layers with sandwich norms: input_layernorm -> attention -> post_attention_layernorm -> + residual,
pre_feedforward_layernorm -> GLU -> post_feedforward_layernorm -> + residual, and a final norm. Every norm
(the per-head q/k norms too) is an RMSNorm scaling by (1 + w): folded into packformer's RMSNorm weight at
load ("plus_one"). Word embeddings times sqrt(hidden), rounded to their dtype. Grouped-query attention,
`head_dim` of its own, scores scaled by query_pre_attn_scalar ** -0.5. Rotary per layer type: the
`full_attention` layers' base (1e6) and the `sliding_attention` layers' (1e4); every sixth layer (i % 6 == 5)
is global in the released pattern (`layer_types` states it; any evenly spaced pattern loads).

Windows: with `use_bidirectional_attention` (EmbeddingGemma) transformers lets a sliding layer's token
see |i - j| < sliding_window // 2 + 1, i.e. |i - j| <= sliding_window // 2 (512 -> 256 each side); the
causal Gemma 3 sees i - sliding_window < j <= i, i.e. a causal window of sliding_window - 1.

Options that do not change inference: dropout, `use_cache`, `final_logit_softcapping` and
`tie_word_embeddings` (the LM head), initialisation settings. `attn_logit_softcapping` and rope scaling are
refused.
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule
from ..ops.rotary import RotaryConfig
from .base import Family, TO_HF_ACTIVATIONS, hf_activation

GLOBAL, LOCAL = "full_attention", "sliding_attention"
DEFAULT_THETA = {GLOBAL: 1_000_000.0, LOCAL: 10_000.0}


def layer_pattern(d: dict, num_layers: int) -> tuple[int, int]:
    """(global_every, global_offset): layer i is global iff (i - offset) % every == 0; (0, 0) when every
    layer is local. From `layer_types`, else the older `sliding_window_pattern` (global when (i + 1) % n == 0)."""
    types = d.get("layer_types")
    if types is None:
        n = int(d.get("sliding_window_pattern", 6))
        types = [LOCAL if (i + 1) % n else GLOBAL for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {GLOBAL, LOCAL}:
        raise ValueError(f"unsupported layer_types {types!r}: expected {num_layers} entries of {GLOBAL!r} / {LOCAL!r}")
    glob = [i for i, t in enumerate(types) if t == GLOBAL]
    if not glob:
        return 0, 0
    every = glob[1] - glob[0] if len(glob) > 1 else num_layers
    offset = glob[0] % every
    if types != [GLOBAL if (i - offset) % every == 0 else LOCAL for i in range(num_layers)]:
        raise ValueError(f"unsupported layer_types {types!r}: packformer runs evenly spaced global layers")
    return every, offset


def rope_bases(d: dict) -> dict[str, float]:
    """{layer type: rotary base}: `rope_parameters` (transformers 5) or rope_theta / rope_local_base_freq."""
    params = d.get("rope_parameters") or {}
    if d.get("rope_scaling"):
        raise ValueError(f"unsupported rope_scaling {d['rope_scaling']!r}: packformer runs default RoPE")
    out = {}
    for kind, key in ((GLOBAL, "rope_theta"), (LOCAL, "rope_local_base_freq")):
        p = params.get(kind) or {}
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_parameters[{kind!r}].rope_type {p['rope_type']!r}: only 'default'")
        out[kind] = float(p.get("rope_theta", d.get(key, DEFAULT_THETA[kind])))
    return out


def config_from_hf(d: dict) -> EncoderConfig:
    """Gemma 3 text config.json -> EncoderConfig; options packformer cannot run raise a ValueError."""
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError(f"unsupported attn_logit_softcapping={d['attn_logit_softcapping']}: packformer's attention "
                         "has no score soft-capping")
    if d.get("attention_bias", False):
        raise ValueError("unsupported attention_bias=True: Gemma 3 layers without biases only")
    archs = d.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"unsupported architectures {archs!r}: packformer loads Gemma3TextModel / Gemma3ForCausalLM")
    hidden, heads = d.get("hidden_size", 768), d.get("num_attention_heads", 3)
    layers = d.get("num_hidden_layers", 24)
    every, offset = layer_pattern(d, layers)
    local = any(not (every and (i - offset) % every == 0) for i in range(layers))
    bidirectional = bool(d.get("use_bidirectional_attention", False))
    sw = d.get("sliding_window", 4096)
    window = (int(sw) // 2 if bidirectional else int(sw) - 1) if local and sw else 0
    if local and window < 1:
        raise ValueError(f"unsupported sliding_window {sw!r}: sliding layers need a window of at least 2 tokens")
    bases = rope_bases(d)
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=d.get("vocab_size", 262144), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, head_size=d.get("head_dim") or hidden // heads,
        intermediate_size=d.get("intermediate_size", 1152),
        max_position_embeddings=d.get("max_position_embeddings", 2048), type_vocab_size=0,
        layer_norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=hf_activation(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
                                 "hidden_activation"),
        pad_token_id=0 if pad is None else int(pad), norm_first=True, embedding_layer_norm=False,
        final_layer_norm=True, position_embedding="none", rotary=RotaryConfig(base=bases[GLOBAL]),
        rotary_local=RotaryConfig(base=bases[LOCAL]) if local and bases[LOCAL] != bases[GLOBAL] else None,
        local_window=window, global_every=every if local else 0, global_offset=offset if local else 0,
        ffn_kind="glu", linear_bias=False, norm_bias=False, norm_kind="rms", qk_norm=True, sandwich_norm=True,
        causal=not bidirectional, attention_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        embedding_scale=hidden ** 0.5, model_type="gemma3_text", family="gemma3")


NORMS = {"norm1": "input_layernorm", "post_norm1": "post_attention_layernorm", "norm2": "pre_feedforward_layernorm",
         "post_norm2": "post_feedforward_layernorm", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """Gemma3TextModel keys (a Gemma3ForCausalLM checkpoint has them under `model.`, stripped by the loader)."""
    L, A = "layers.{i}.", "layers.{i}.self_attn."
    rules = [Rule.of("embeddings.word.weight", "embed_tokens.weight"),
             Rule.of("final_norm.weight", "norm.weight", transform="plus_one"),
             Rule.of(L + "qkv.weight", A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"),
             Rule.of(L + "out.weight", A + "o_proj.weight"),
             Rule.of(L + "ffn1.weight", L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
             Rule.of(L + "ffn2.weight", L + "mlp.down_proj.weight")]
    rules += [Rule.of(f"{L}{ours}.weight", f"{L}{theirs}.weight", transform="plus_one") for ours, theirs in NORMS.items()]
    absent = [f"layers.*.{m}.bias" for m in ("qkv", "out", "ffn1", "ffn2")]
    return KeyMap(rules, ignore=["lm_head.*"], absent=absent)


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers Gemma3TextConfig (bidirectional = use_bidirectional_attention)."""
    from transformers import Gemma3TextConfig

    want = dict(norm_first=True, norm_kind="rms", qk_norm=True, ffn_kind="glu", sandwich_norm=True,
                final_layer_norm=True, embedding_layer_norm=False, position_embedding="none", type_vocab_size=0,
                linear_bias=False, relative_bias=None, disentangled=None, adapters=None)
    off = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    rots = [r for r in (cfg.rotary, cfg.rotary_local) if r is not None]
    if off or not rots or any(r != RotaryConfig(base=r.base) for r in rots) or cfg.embedding_scale != cfg.hidden_size ** 0.5:
        raise ValueError(f"no Gemma3TextConfig states this model: {off or rots or cfg.embedding_scale}")
    local = cfg.rotary_local or cfg.rotary
    types = [LOCAL if cfg.is_local(i) else GLOBAL for i in range(cfg.num_layers)]
    bidirectional = not cfg.causal
    window = cfg.local_window or 256
    sw = 2 * window if bidirectional else window + 1
    return Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_activation=TO_HF_ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.layer_norm_eps,
        query_pre_attn_scalar=int(round(cfg.scale ** -2)), sliding_window=sw, layer_types=types,
        use_bidirectional_attention=bidirectional, pad_token_id=cfg.pad_token_id,
        rope_parameters={GLOBAL: {"rope_type": "default", "rope_theta": cfg.rotary.base},
                         LOCAL: {"rope_type": "default", "rope_theta": local.base}})


FAMILY = Family(
    name="gemma3", model_types=("gemma3_text",), config_from_hf=config_from_hf, keymap=keymap,
    to_hf_config=to_hf_config, anchor="embed_tokens.weight",
    presets={
        "embeddinggemma-300m": EncoderConfig(
            vocab_size=262144, hidden_size=768, num_layers=24, num_heads=3, num_kv_heads=1, head_size=256,
            intermediate_size=1152, max_position_embeddings=2048, type_vocab_size=0, layer_norm_eps=1e-6,
            activation="gelu_tanh", pad_token_id=0, norm_first=True, embedding_layer_norm=False,
            final_layer_norm=True, position_embedding="none", rotary=RotaryConfig(base=1_000_000.0),
            rotary_local=RotaryConfig(base=10_000.0), local_window=256, global_every=6, global_offset=5,
            ffn_kind="glu", linear_bias=False, norm_bias=False, norm_kind="rms", qk_norm=True, sandwich_norm=True,
            causal=False, attention_scale=256 ** -0.5, embedding_scale=768 ** 0.5, model_type="gemma3_text",
            family="gemma3"),
    },
    gpu_dtype="bfloat16",                # trained in bf16: fp16 can overflow its activations
    reference="transformers Gemma3TextModel (use_bidirectional_attention, eager and sdpa), sentence-transformers "
              "(mean pooling + Dense + Normalize)",
)
