"""ModernBERT (transformers ModernBertModel / ModernBertForSequenceClassification, model_type "modernbert").

Pre-norm layers whose first attention norm is the identity, a final norm, no absolute positions and no
token types: rotary on q/k, with one base on the global layers and another on the local ones. Every
`global_attn_every_n_layers`-th layer (i % n == 0) is global; the others attend to |i - j| <= local_attention
// 2 (transformers' bidirectional sliding-window mask, and flash attention's inclusive window of that half
width). The FFN is a GeGLU: `mlp.Wi` rows are [input; gate] and out = act(input) * gate, which is
packformer's [gate; up] with act on the first half, so Wi loads as it is. Linear and LayerNorm biases are
per config (all off in the released models); the fused `attn.Wqkv` rows are [q; k; v].

Options that do not change inference: every dropout, `reference_compile` / `compile` (torch.compile of the
training path), unpadding and `deterministic_flash_attn` (attention kernels, not the function computed),
`sparse_prediction`, `decoder_bias` and tied embeddings (the masked-LM head), initialisation settings, and
the unused BERT-era keys the released configs carry (`position_embedding_type`, `layer_norm_eps`).
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule
from ..ops.rotary import RotaryConfig
from .base import Family, TO_HF_ACTIVATIONS, classification_labels, hf_activation

GLOBAL, LOCAL = "full_attention", "sliding_attention"
DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
HEAD_POOLINGS = ("cls", "mean")


def _layer_pattern(d: dict, num_layers: int) -> int:
    """global_every such that layer i is global iff i % global_every == 0 (0: every layer local).

    transformers >= 5 writes `layer_types`; older configs (and the released ones) state the pattern as
    `global_attn_every_n_layers` only."""
    n_key = d.get("global_attn_every_n_layers")
    types = d.get("layer_types")
    if types is None:
        n = 3 if n_key is None else int(n_key)
        if n < 1:
            raise ValueError(f"unsupported global_attn_every_n_layers {n_key!r}: it must be >= 1")
        return n
    if len(types) != num_layers or set(types) - {GLOBAL, LOCAL}:
        raise ValueError(f"unsupported layer_types {types!r}: expected {num_layers} entries of "
                         f"{GLOBAL!r} / {LOCAL!r}")
    glob = [i for i, t in enumerate(types) if t == GLOBAL]
    n = 0 if not glob else (glob[1] - glob[0] if len(glob) > 1 else num_layers)
    if types != [GLOBAL if n and i % n == 0 else LOCAL for i in range(num_layers)]:
        raise ValueError(f"unsupported layer_types {types!r}: packformer runs global layers at i % n == 0 "
                         "(every n-th layer from layer 0) and local ones elsewhere")
    if n_key is not None and types != [GLOBAL if i % int(n_key) == 0 else LOCAL for i in range(num_layers)]:
        raise ValueError(f"config.json states two layer patterns: layer_types {types!r} and "
                         f"global_attn_every_n_layers={n_key}")
    return n


def _rope_bases(d: dict) -> dict[str, float]:
    """{layer type: rotary base}: `rope_parameters` (transformers >= 5) or global/local_rope_theta."""
    params = d.get("rope_parameters") or {}
    if d.get("rope_scaling") is not None:
        raise ValueError(f"unsupported rope_scaling {d['rope_scaling']!r}: packformer runs default RoPE")
    out = {}
    for kind, key in ((GLOBAL, "global_rope_theta"), (LOCAL, "local_rope_theta")):
        p = params.get(kind) or {}
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_parameters[{kind!r}].rope_type {p['rope_type']!r}: only 'default'")
        out[kind] = p.get("rope_theta", d.get(key, DEFAULT_THETA[kind]))
    if out[LOCAL] is None:   # transformers 4.x: local layers without their own base use the global one
        out[LOCAL] = out[GLOBAL]
    return out


def config_from_hf(d: dict) -> EncoderConfig:
    """ModernBERT config.json -> EncoderConfig; options packformer cannot run raise a ValueError."""
    if d.get("attention_bias", False) != d.get("mlp_bias", False):
        raise ValueError(f"unsupported attention_bias={d.get('attention_bias')} with mlp_bias={d.get('mlp_bias')}: "
                         "packformer states Linear biases for the whole layer (both on or both off)")
    if d.get("classifier_activation", "gelu") not in ("gelu", "gelu_python"):
        raise ValueError(f"unsupported classifier_activation {d['classifier_activation']!r}: only 'gelu'")
    pooling = d.get("classifier_pooling", "cls")
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"unsupported classifier_pooling {pooling!r}: one of {HEAD_POOLINGS}")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * d["num_attention_heads"] != d["hidden_size"]:
        raise ValueError(f"unsupported head_dim {head_dim}: packformer needs hidden_size / num_attention_heads")
    layers = d.get("num_hidden_layers", 22)
    every = _layer_pattern(d, layers)
    local = any(not (every and i % every == 0) for i in range(layers))
    window = int(d.get("local_attention", 128)) // 2
    if local and window < 1:
        raise ValueError(f"unsupported local_attention {d.get('local_attention')!r}: local layers need >= 2")
    bases = _rope_bases(d)
    num_labels, id2label = classification_labels(d)
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=d.get("vocab_size", 50368), hidden_size=d.get("hidden_size", 768), num_layers=layers,
        num_heads=d.get("num_attention_heads", 12), intermediate_size=d.get("intermediate_size", 1152),
        max_position_embeddings=d.get("max_position_embeddings", 8192), type_vocab_size=0,
        layer_norm_eps=d.get("norm_eps", 1e-5),
        activation=hf_activation(d.get("hidden_activation", "gelu"), "hidden_activation"),
        pad_token_id=50283 if pad is None else int(pad), position_offset=0, norm_first=True,
        embedding_layer_norm=True, final_layer_norm=True, first_attention_norm=False, position_embedding="none",
        rotary=RotaryConfig(base=float(bases[GLOBAL])),
        rotary_local=RotaryConfig(base=float(bases[LOCAL])) if local and bases[LOCAL] != bases[GLOBAL] else None,
        local_window=window if local else 0, global_every=every if local else 0, ffn_kind="glu",
        linear_bias=bool(d.get("attention_bias", False)), norm_bias=bool(d.get("norm_bias", False)),
        head_pooling=pooling, head_bias=bool(d.get("classifier_bias", False)),
        model_type="modernbert", family="modernbert", num_labels=num_labels, id2label=id2label,
    )


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """ModernBertModel keys (a *ForSequenceClassification checkpoint has them under `model.`, stripped by
    the loader; its `head.*` and `classifier.*` stay at the top). Biases a config turns off are absent."""
    lb, nb = cfg.linear_bias, cfg.norm_bias
    L = "layers.{i}."
    pairs = [("embeddings.word.weight", "embeddings.tok_embeddings.weight"),
             ("embeddings.norm.weight", "embeddings.norm.weight"), ("final_norm.weight", "final_norm.weight"),
             (L + "qkv.weight", L + "attn.Wqkv.weight"), (L + "out.weight", L + "attn.Wo.weight"),
             (L + "ffn1.weight", L + "mlp.Wi.weight"), (L + "ffn2.weight", L + "mlp.Wo.weight"),
             (L + "norm2.weight", L + "mlp_norm.weight")]
    pairs += [(f"layers.{i}.norm1.weight", f"layers.{i}.attn_norm.weight") for i in range(1, cfg.num_layers)]
    if lb:
        pairs += [(L + p + ".bias", L + s + ".bias") for p, s in
                  (("qkv", "attn.Wqkv"), ("out", "attn.Wo"), ("ffn1", "mlp.Wi"), ("ffn2", "mlp.Wo"))]
    if nb:
        pairs += [(t.replace(".weight", ".bias"), s.replace(".weight", ".bias")) for t, s in pairs
                  if "norm" in t]
    ignore = ["decoder.*"]                  # the masked-LM decoder
    absent = [] if lb else ["layers.*.qkv.bias", "layers.*.out.bias", "layers.*.ffn1.bias", "layers.*.ffn2.bias"]
    absent += [] if nb else ["embeddings.norm.bias", "layers.*.norm1.bias", "layers.*.norm2.bias", "final_norm.bias"]
    if with_head:
        pairs += [("head.dense.weight", "head.dense.weight"), ("head.norm.weight", "head.norm.weight"),
                  ("head.out.weight", "classifier.weight"), ("head.out.bias", "classifier.bias")]
        pairs += [("head.dense.bias", "head.dense.bias")] if cfg.head_bias else []
        pairs += [("head.norm.bias", "head.norm.bias")] if nb else []
        absent += [] if cfg.head_bias else ["head.dense.bias"]
    else:                                   # a masked-LM or task head (dense + norm, classifier)
        ignore += ["head.*", "classifier.*"]
    return KeyMap([Rule.of(t, s) for t, s in pairs], ignore=ignore, absent=absent)


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers ModernBertConfig (>= 4.48; the layer pattern and bases are written both
    as the 4.x keys and as transformers 5's layer_types / rope_parameters)."""
    from transformers import ModernBertConfig

    want = dict(norm_first=True, first_attention_norm=False, final_layer_norm=True, embedding_layer_norm=True,
                position_embedding="none", ffn_kind="glu", type_vocab_size=0, position_offset=0,
                relative_bias=None, disentangled=None, adapters=None)
    off = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k, v) != v}
    rots = [r for r in (cfg.rotary, cfg.rotary_local) if r is not None]
    if off or not rots or any(r != RotaryConfig(base=r.base) for r in rots):
        raise ValueError(f"no ModernBertConfig states this model: {off or 'its rotary ' + repr(rots)}")
    local = cfg.rotary_local or cfg.rotary
    types = [LOCAL if cfg.is_local(i) else GLOBAL for i in range(cfg.num_layers)]
    every = cfg.global_every if cfg.local_window else 1     # 0: every layer local, which layer_types alone states
    return ModernBertConfig(**({"global_attn_every_n_layers": every} if every else {}),
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        hidden_activation=TO_HF_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_position_embeddings,
        norm_eps=cfg.layer_norm_eps, norm_bias=cfg.norm_bias, attention_bias=cfg.linear_bias,
        mlp_bias=cfg.linear_bias, pad_token_id=cfg.pad_token_id, local_attention=2 * (cfg.local_window or 64),
        layer_types=types, global_rope_theta=cfg.rotary.base, local_rope_theta=local.base,
        rope_parameters={GLOBAL: {"rope_type": "default", "rope_theta": cfg.rotary.base},
                         LOCAL: {"rope_type": "default", "rope_theta": local.base}},
        classifier_pooling=cfg.head_pooling or "cls", classifier_bias=cfg.head_bias, classifier_activation="gelu",
        num_labels=max(cfg.num_labels, 1))


def _preset(**shape) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=50368, max_position_embeddings=8192, type_vocab_size=0, layer_norm_eps=1e-5,
        activation="gelu", pad_token_id=50283, norm_first=True, final_layer_norm=True, first_attention_norm=False,
        position_embedding="none", rotary=RotaryConfig(base=160_000.0), rotary_local=RotaryConfig(base=10_000.0),
        local_window=64, global_every=3, ffn_kind="glu", linear_bias=False, norm_bias=False, head_bias=False,
        head_pooling="cls", model_type="modernbert", family="modernbert", **shape)


FAMILY = Family(
    name="modernbert", model_types=("modernbert",), config_from_hf=config_from_hf, keymap=keymap,
    to_hf_config=to_hf_config, anchor="embeddings.tok_embeddings.weight",
    presets={
        "modernbert-base": _preset(hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152),
        "modernbert-large": _preset(hidden_size=1024, num_layers=28, num_heads=16, intermediate_size=2624),
    },
    hf_head_keys=("head.", "classifier."), head_act="gelu", head_norm=True,
    reference="transformers ModernBertModel / ModernBertForSequenceClassification (eager and sdpa attention)",
)
