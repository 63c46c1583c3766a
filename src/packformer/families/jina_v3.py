"""Jina Embeddings v3: XLM-RoBERTa with rotary positions and per-task LoRA adapters.

Two checkpoint formats:
- Jina's remote code (config.json model_type "xlm-roberta" with `position_embedding_type: "rotary"` and
  `lora_adaptations`; auto_map to jinaai/xlm-roberta-flash-implementation). Every Linear and embedding table
  of `XLMRobertaLoRA.roberta` carries a torch parametrization, so a weight is stored as
  `<module>.parametrizations.weight.original` and its factors as `<module>.parametrizations.weight.0.lora_A`
  / `lora_B` (lora.py gives their shapes); norms and biases are plain. The unused pooler (adapted too) is
  ignored. A config without `lora_adaptations` has plain `<module>.weight` keys.
- transformers' JinaEmbeddingsV3Model (model_type "jina_embeddings_v3", no adapters), whose save_pretrained
  writes the same flash-style names (`emb_ln`, `encoder.layers.{i}.mixer.Wqkv`, `mlp.fc1`, `norm1`, ...).

The encoder is XLM-R's post-norm layer: no position table, token types (one row), the embedding LayerNorm
(`emb_ln`), fused Wqkv rows [q; k; v], exact GELU (the tanh variants map to gelu_tanh, as the remote code's
MLP does), rotary on the whole head with pairs (i, i + d/2) (or as `rotary_emb_dim` / `rotary_emb_interleaved`
say) and positions counted from 0 in each sequence. Inputs are cut at max_position_embeddings tokens (8,194:
the tokenizer's model_max_length, where Jina's encode cuts them).

Tasks: `packformer.load(path, task=...)` / `encode(task=...)` run the task's adapter merged into the weights
(lora.py) and prepend the task's instruction to every text, as `XLMRobertaLoRA.encode(task=...)` does
(retrieval.query and retrieval.passage have one). Without a task the base weights run with no instruction,
as Jina's code does. Embeddings are mean-pooled and L2-normalized like its `encode` (`emb_pooler: "cls"`
pools the first token).

Options that do not change inference: dropouts (LoRA's too), `use_flash_attn`, `fused_bias_fc`, `fused_mlp`,
`fused_dropout_add_ln`, `last_layer_subset`, `use_reentrant`, `lora_main_params_trainable`, `torch_dtype`,
`matryoshka_dimensions` (the dims `truncate_dim` may take).
"""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule
from ..lora import LINEAR_TARGETS, LoraAdapters
from ..ops.rotary import RotaryConfig
from .base import Family, classification_labels, hf_activation, port_config_kwargs, transformers_class
from .bert import ROBERTA_HEAD_RULES

REMOTE, NATIVE = "xlm-roberta", "jina_embeddings_v3"
# the remote code's MLP runs F.gelu(approximate="tanh") for each of these
TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
INSTRUCTIONS = {"retrieval.query": "Represent the query for retrieving evidence documents: ",
                "retrieval.passage": "Represent the document for retrieval: ",
                "separation": "", "classification": "", "text-matching": ""}
# packformer target -> the flash implementation's module (its weight may be LoRA-parametrized)
_L = "encoder.layers.{i}."
LAYER_MODULES = {"qkv": "mixer.Wqkv", "out": "mixer.out_proj", "ffn1": "mlp.fc1", "ffn2": "mlp.fc2"}
NATIVE_LAYER = "layers.{i}."


def claims(d: dict) -> bool:
    """Jina's remote-code configs share model_type "xlm-roberta" with the bert family's plain XLM-R."""
    return d.get("model_type") == REMOTE and (d.get("position_embedding_type") == "rotary"
                                              or "lora_adaptations" in d)


def _activation(d: dict) -> str:
    name = d.get("hidden_act", "gelu")
    if d.get("model_type") == NATIVE:
        return hf_activation(name)
    if name not in ("gelu",) + TANH_GELUS:      # the remote code asserts one of these
        raise ValueError(f"unsupported hidden_act {name!r}: the remote code runs 'gelu' or {', '.join(TANH_GELUS)}")
    return "gelu_tanh" if name in TANH_GELUS else "gelu"


def _rotary(d: dict, head_dim: int) -> RotaryConfig:
    """The rotary settings of either format (checked: default RoPE, no xPos scaling)."""
    if d.get("model_type") == NATIVE:
        p = d.get("rope_parameters") or {}
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_parameters.rope_type {p['rope_type']!r}: only 'default'")
        if d.get("rope_scaling") is not None:
            raise ValueError(f"unsupported rope_scaling {d['rope_scaling']!r}: packformer runs default RoPE")
        return RotaryConfig(base=float(p.get("rope_theta", d.get("rope_theta", 20000.0))))
    pos = d.get("position_embedding_type", "rotary")        # XLMRobertaFlashConfig's default
    if pos != "rotary":
        raise ValueError(f"unsupported position_embedding_type {pos!r}: the jina_v3 family runs 'rotary' only")
    if d.get("rotary_emb_scale_base") is not None:
        raise ValueError(f"unsupported rotary_emb_scale_base {d['rotary_emb_scale_base']!r}: xPos scaling is not run")
    dim = d.get("rotary_emb_dim")
    dim = None if dim is None or int(dim) == head_dim else int(dim)
    return RotaryConfig(base=float(d.get("rotary_emb_base", 10000.0)), dim=dim,
                        interleaved=bool(d.get("rotary_emb_interleaved", False)))


def _adapters(d: dict) -> LoraAdapters | None:
    """LoraAdapters of a remote-code config with `lora_adaptations`, checked as XLMRobertaLoRA checks them."""
    tasks = d.get("lora_adaptations")
    if tasks is None:
        return None
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"unsupported lora_adaptations {tasks!r}: a non-empty list of task names")
    if d.get("load_trained_adapters", True) is False:
        raise ValueError("unsupported load_trained_adapters false: such a checkpoint holds no trained adapters "
                         "(Jina's code would start new ones for training); packformer loads trained adapters")
    ins = d.get("task_instructions")
    if ins is None:
        ins = {}
    if not isinstance(ins, dict) or set(ins) - set(tasks):
        raise ValueError(f"unsupported task_instructions {ins!r}: a dict keyed by tasks of lora_adaptations {tasks}")
    return LoraAdapters(tasks=tuple(tasks), rank=int(d.get("lora_rank", 4)), alpha=float(d.get("lora_alpha", 1)),
                        instructions=tuple(ins.items()))


def config_from_hf(d: dict) -> EncoderConfig:
    """A Jina v3 config.json (remote-code or transformers) -> EncoderConfig; options packformer cannot run
    raise a ValueError naming them."""
    if d.get("truncate_dim") is not None:
        raise ValueError(f"unsupported truncate_dim {d['truncate_dim']!r}: packformer returns whole embeddings "
                         "(slice them, or ask the OpenAI route for `dimensions`)")
    hidden, heads = d.get("hidden_size", 1024), d.get("num_attention_heads", 16)
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    adapters = _adapters(d) if d.get("model_type") == REMOTE else None
    num_labels, id2label = classification_labels(d)
    if num_labels and adapters is not None:
        raise ValueError("unsupported: a classification head on a model with LoRA adapters "
                         f"(architectures {d.get('architectures')})")
    vocab = d.get("vocab_size", 250002)
    vocab += -vocab % int(d.get("pad_vocab_size_multiple", 1))   # the remote code pads the table so
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=d.get("num_hidden_layers", 24), num_heads=heads,
        intermediate_size=d.get("intermediate_size", 4096),
        max_position_embeddings=d.get("max_position_embeddings", 8194),
        type_vocab_size=d.get("type_vocab_size", 1), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        activation=_activation(d), pad_token_id=1 if pad is None else int(pad),
        position_offset=0, position_embedding="none", rotary=_rotary(d, hidden // heads),
        model_type=d.get("model_type", REMOTE), family="jina_v3", num_labels=num_labels, id2label=id2label,
        adapters=adapters,
    )


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """The flash implementation's names (prefix `roberta.` stripped by the loader). With adapters a weight is
    `<module>.parametrizations.weight.original` and its factors `...parametrizations.weight.0.lora_A/B`."""
    lora = cfg.adapters is not None

    def weight(module: str) -> str:
        return f"{module}.parametrizations.weight.original" if lora else f"{module}.weight"

    rules = [Rule.of("embeddings.word.weight", weight("embeddings.word_embeddings")),
             Rule.of("embeddings.norm.weight", "emb_ln.weight"), Rule.of("embeddings.norm.bias", "emb_ln.bias")]
    tables = {"word": "embeddings.word_embeddings"}
    if cfg.type_vocab_size > 0:
        rules.append(Rule.of("embeddings.token_type.weight", weight("embeddings.token_type_embeddings")))
        tables["token_type"] = "embeddings.token_type_embeddings"
    for ours, theirs in LAYER_MODULES.items():
        rules += [Rule.of(f"layers.{{i}}.{ours}.weight", weight(_L + theirs)),
                  Rule.of(f"layers.{{i}}.{ours}.bias", _L + theirs + ".bias")]
    for n in ("norm1", "norm2"):
        rules += [Rule.of(f"layers.{{i}}.{n}.{p}", f"{_L}{n}.{p}") for p in ("weight", "bias")]
    if lora:
        factors = [(f"lora.{ours}", module) for ours, module in tables.items()]
        factors += [(f"lora.layers.{{i}}.{ours}", _L + LAYER_MODULES[ours]) for ours in LINEAR_TARGETS]
        rules += [Rule.of(f"{ours}.{ab}", f"{module}.parametrizations.weight.0.lora_{ab}")
                  for ours, module in factors for ab in ("A", "B")]
    ignore = ["pooler.*", "lm_head.*"]
    if with_head:
        rules += ROBERTA_HEAD_RULES
    else:
        ignore.append("classifier.*")
    return KeyMap(rules, ignore=ignore)


def hf_keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    """transformers' JinaEmbeddingsV3Model state-dict names (q/k/v apart), for bench.convert.to_hf."""
    L = NATIVE_LAYER
    rules = [Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
             Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
             Rule.of("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
             Rule.of("embeddings.norm.bias", "embeddings.LayerNorm.bias")]
    for p in ("weight", "bias"):
        rules += [Rule.of(f"layers.{{i}}.qkv.{p}", *(f"{L}self_attn.{x}_proj.{p}" for x in "qkv")),
                  Rule.of(f"layers.{{i}}.out.{p}", f"{L}self_attn.o_proj.{p}"),
                  Rule.of(f"layers.{{i}}.ffn1.{p}", f"{L}mlp.fc1.{p}"),
                  Rule.of(f"layers.{{i}}.ffn2.{p}", f"{L}mlp.fc2.{p}"),
                  Rule.of(f"layers.{{i}}.norm1.{p}", f"{L}post_attention_layernorm.{p}"),
                  Rule.of(f"layers.{{i}}.norm2.{p}", f"{L}post_mlp_layernorm.{p}")]
    return KeyMap(rules + (ROBERTA_HEAD_RULES if with_head else []))


def to_hf_config(cfg: EncoderConfig):
    """EncoderConfig -> transformers JinaEmbeddingsV3Config (transformers >= 5). It has no adapters: the
    peer runs the base weights, as packformer does without a task."""
    JinaEmbeddingsV3Config = transformers_class("JinaEmbeddingsV3Config")

    want = dict(norm_first=False, final_layer_norm=False, embedding_layer_norm=True, position_embedding="none",
                ffn_kind="mlp", linear_bias=True, norm_bias=True, local_window=0, relative_bias=None)
    off = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if off or cfg.rotary is None or cfg.rotary != RotaryConfig(base=cfg.rotary.base):
        raise ValueError(f"no JinaEmbeddingsV3Config states this model: {off or 'its rotary ' + repr(cfg.rotary)}")
    return JinaEmbeddingsV3Config(**port_config_kwargs(cfg), num_labels=max(cfg.num_labels, 1),
                                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary.base})


def embedding_pooling(d: dict) -> tuple[str, bool]:
    """Jina's encode(): the first token with emb_pooler "cls", else (any other value) mean pooling; then
    L2 normalization."""
    return ("cls" if d.get("emb_pooler") == "cls" else "mean"), True


PRESET = EncoderConfig(
    vocab_size=250002, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
    max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5, activation="gelu", pad_token_id=1,
    position_offset=0, position_embedding="none", rotary=RotaryConfig(base=20000.0), model_type=REMOTE,
    family="jina_v3", adapters=LoraAdapters(tasks=TASKS, rank=4, alpha=1.0, instructions=tuple(INSTRUCTIONS.items())),
)

FAMILY = Family(
    name="jina_v3", model_types=(NATIVE,), config_from_hf=config_from_hf, keymap=keymap, claims=claims,
    to_hf_config=to_hf_config, hf_keymap=hf_keymap, anchor="emb_ln.weight", presets={"jina-embeddings-v3": PRESET},
    hf_pooling_layer=True, hf_head_keys=("classifier.",), embedding_pooling=embedding_pooling,
    reference="tests/families/ref_jina_v3.py (the remote code's XLMRobertaLoRA, transcribed: LoRA per task, "
              "instructions); transformers JinaEmbeddingsV3Model / ForSequenceClassification",
)
