"""NomicBERT (nomic-embed-text-v1 / v1.5, nomic-bert-2048; model_type "nomic_bert"): remote code
(`NomicBertModel` of nomic-ai/contrastors' modeling_hf_nomic_bert.py). Recent transformers' own NomicBertModel
(other config keys, renamed weights; full rotary, SwiGLU, no Linear biases) is the bench peer where it can
state the model (`to_hf_config`, `hf_keymap`).

Post-norm BERT layers on GPT2-style config names (n_embd, n_head, n_layer, n_inner, layer_norm_epsilon):
word + token-type embeddings and `emb_ln`, no absolute positions once `rotary_emb_fraction` > 0 (learned
ones from position 0 otherwise). Attention: `attn.Wqkv` rows [q; k; v], rotary on the first
head_dim * rotary_emb_fraction dims of q and k (rotate_half pairs, or GPT-J pairs with
`rotary_emb_interleaved`), base `rotary_emb_base`; `attn.out_proj`. FFN: "swiglu" / "geglu" is
fc2(fc11(x) * act(fc12(x))), act SiLU / GELU, so packformer's [gate; up] rows are [fc12; fc11], the hidden
size rounded up to a multiple of 256 as NomicBertModel builds it; "gelu" (and every gelu variant, which the
original runs as the exact erf GELU) is fc2(gelu(fc1(x))). Biases: `qkv_proj_bias` (Wqkv and out_proj),
`mlp_fc1_bias`, `mlp_fc2_bias`, all off in the released models. The vocabulary is padded up to
`pad_vocab_size_multiple`. Classification: tanh(pooler.dense(h[CLS])) -> classifier, the model under `bert.`.

`rotary_scaling_factor` (dynamic NTK) changes the rotary base only once a padded batch is longer than
`max_trained_positions`, by an amount that depends on that padded length: packformer runs such a model up
to max_trained_positions tokens, where it is the plain rotary model.

Options that do not change inference: dropouts (the remote code passes `attn_pdrop` to its attention even in
eval mode; the released models set 0.0), fused_bias_fc / fused_dropout_add_ln / use_flash_attn / use_xentropy
(kernels), dense_seq_output and tied embeddings (the pre-training head), the unused GPT-2 keys.
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule
from ..ops.rotary import RotaryConfig
from .base import Family, classification_labels, glu_port_keymap, port_config_kwargs, transformers_class

GATED = {"swiglu": "silu", "geglu": "gelu"}
PLAIN = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")     # all run as the exact GELU by the original
# GPT2Config's and NomicBertConfig's defaults for keys a config.json may leave out
DEFAULTS = dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
                layer_norm_epsilon=1e-5, rotary_emb_fraction=0.0, rotary_emb_base=10_000, rotary_emb_interleaved=False,
                qkv_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True, type_vocab_size=2, pad_vocab_size_multiple=1,
                max_trained_positions=2048, vocab_size=50257)
# options whose other values packformer does not run (their defaults are the released models' values)
REJECT = dict(prenorm=False, parallel_block=False, use_rms_norm=False, causal=False, rotary_emb_scale_base=None,
              rotary_head_dim=False, norm_mlp=False, moe_every_n_layers=0)


def config_from_hf(d: dict) -> EncoderConfig:
    """NomicBertConfig config.json -> EncoderConfig; options packformer cannot run raise a ValueError."""
    if "n_embd" not in d and "hidden_size" in d:
        raise ValueError("this nomic_bert config.json has hidden_size instead of n_embd: it is written for "
                         "transformers' own NomicBertModel, whose weights are renamed; packformer loads the "
                         "remote-code checkpoints (n_embd, attn.Wqkv, mlp.fc11 ...)")
    g = {**DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    for key, ok in REJECT.items():
        if d.get(key) not in (None, ok):
            raise ValueError(f"unsupported {key}={d[key]!r}: packformer runs NomicBERT with {key}={ok!r} "
                             "(the released models' value)")
    if d.get("num_heads_kv") not in (None, g["n_head"]):
        raise ValueError(f"unsupported num_heads_kv={d['num_heads_kv']!r}: packformer runs multi-head attention")
    act = g["activation_function"]
    if act not in GATED and act not in PLAIN:
        raise ValueError(f"unsupported activation_function {act!r}: one of {', '.join((*GATED, *PLAIN))}")
    biases = {k: bool(g[k]) for k in ("qkv_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias")}
    if len(set(biases.values())) > 1:
        raise ValueError(f"unsupported bias mix {biases}: packformer states Linear biases for the whole layer "
                         "(all on or all off)")
    h, heads = int(g["n_embd"]), int(g["n_head"])
    if g["n_inner"] is not None:
        inner = int(g["n_inner"])
    else:
        inner = int(8 * h / 3) if act in GATED else 4 * h
    if act in GATED:                       # NomciBertGatedMLP(multiple_of=256)
        inner = (inner + 255) // 256 * 256
    vocab, mult = int(g["vocab_size"]), int(g["pad_vocab_size_multiple"])
    vocab += -vocab % mult
    frac = float(g["rotary_emb_fraction"])
    rotary, max_pos = None, int(g["n_positions"])
    if frac > 0:
        rot = h // heads * frac
        if not rot.is_integer() or int(rot) % 2:
            raise ValueError(f"unsupported rotary_emb_fraction {frac}: head_dim {h // heads} * fraction must be an "
                             "even number of dims")
        rotary = RotaryConfig(base=float(g["rotary_emb_base"]), dim=None if int(rot) == h // heads else int(rot),
                              interleaved=bool(g["rotary_emb_interleaved"]))
        if max_pos <= 0:                   # NomicBertPreTrainedModel.from_pretrained's fallback
            max_pos = 2048
        if d.get("rotary_scaling_factor"):
            max_pos = min(max_pos, int(g["max_trained_positions"]))
    num_labels, id2label = classification_labels(d)
    return EncoderConfig(
        vocab_size=vocab, hidden_size=h, num_layers=int(g["n_layer"]), num_heads=heads, intermediate_size=inner,
        max_position_embeddings=max_pos, type_vocab_size=int(g["type_vocab_size"]),
        layer_norm_eps=float(g["layer_norm_epsilon"]), activation=GATED.get(act, "gelu"),
        pad_token_id=int(d.get("pad_token_id") or 0), position_offset=0, norm_first=False, embedding_layer_norm=True,
        position_embedding="none" if rotary else "absolute", rotary=rotary, ffn_kind="glu" if act in GATED else "mlp",
        linear_bias=biases["qkv_proj_bias"], model_type="nomic_bert", family="nomic_bert",
        num_labels=num_labels, id2label=id2label,
    )


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """NomicBertModel keys (a NomicBertForSequenceClassification / ForPreTraining checkpoint has them under
    `bert.`, stripped by the loader)."""
    L = "encoder.layers.{i}."
    glu = cfg.ffn_kind == "glu"
    pairs = [("embeddings.word.weight", ["embeddings.word_embeddings.weight"]),
             ("embeddings.norm.weight", ["emb_ln.weight"]), ("embeddings.norm.bias", ["emb_ln.bias"])]
    if cfg.type_vocab_size > 0:
        pairs.append(("embeddings.token_type.weight", ["embeddings.token_type_embeddings.weight"]))
    if cfg.position_embedding == "absolute":
        pairs.append(("embeddings.position.weight", ["embeddings.position_embeddings.weight"]))
    linears = [("qkv", ["attn.Wqkv"]), ("out", ["attn.out_proj"]),
               ("ffn1", ["mlp.fc12", "mlp.fc11"] if glu else ["mlp.fc1"]), ("ffn2", ["mlp.fc2"])]
    for ours, theirs in linears:
        for p in ("weight", "bias") if cfg.linear_bias else ("weight",):
            pairs.append((f"layers.{{i}}.{ours}.{p}", [f"{L}{t}.{p}" for t in theirs]))
    for n in ("norm1", "norm2"):
        pairs += [(f"layers.{{i}}.{n}.{p}", [f"{L}{n}.{p}"]) for p in ("weight", "bias")]
    ignore = ["cls.*", "*rotary_emb.*", "*.norm_factor"]      # the MLM head; non-persistent buffers
    if with_head:
        pairs += [("head.dense.weight", ["pooler.dense.weight"]), ("head.dense.bias", ["pooler.dense.bias"]),
                  ("head.out.weight", ["classifier.weight"]), ("head.out.bias", ["classifier.bias"])]
    else:
        ignore += ["pooler.*", "classifier.*"]
    absent = [] if cfg.linear_bias else [f"layers.*.{n}.bias" for n in ("qkv", "out", "ffn1", "ffn2")]
    return KeyMap([Rule.of(t, *s) for t, s in pairs], ignore=ignore, absent=absent)


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers NomicBertConfig (transformers >= 5), which runs rotary on whole heads
    (rotate_half pairs), a GLU FFN and no Linear biases: other NomicBERT variants raise a ValueError."""
    NomicBertConfig = transformers_class("NomicBertConfig")

    rot = cfg.rotary
    off = {k: getattr(cfg, k) for k, v in dict(ffn_kind="glu", linear_bias=False, position_embedding="none",
                                                 norm_first=False).items() if getattr(cfg, k) != v}
    if off or rot is None or rot != RotaryConfig(base=rot.base):
        raise ValueError(f"no NomicBertConfig states this model: {off or 'its rotary ' + repr(rot)}")
    return NomicBertConfig(**port_config_kwargs(cfg),
                           rope_parameters={"rope_type": "default", "rope_theta": rot.base})


FAMILY = Family(
    name="nomic_bert", model_types=("nomic_bert",), config_from_hf=config_from_hf, keymap=keymap,
    reference="a transcription of NomicBertModel / NomicBertForSequenceClassification (nomic-ai/contrastors "
              "modeling_hf_nomic_bert.py, the checkpoints' remote code) in tests/families/ref_nomic_bert.py, "
              "and transformers' NomicBertModel",
    to_hf_config=to_hf_config,
    hf_keymap=lambda cfg, with_head: glu_port_keymap(cfg, with_head, attn_bias=False, down_bias=False),
    presets={
        # nomic-embed-text-v1.5 (and v1): 2048 is the trained length (max_trained_positions)
        "nomic-embed-text-v1.5": EncoderConfig(
            vocab_size=30528, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
            max_position_embeddings=2048, type_vocab_size=2, layer_norm_eps=1e-12, activation="silu",
            position_embedding="none", rotary=RotaryConfig(base=1000.0), ffn_kind="glu", linear_bias=False,
            model_type="nomic_bert", family="nomic_bert"),
    },
)
