"""DeBERTa-v2 and v3 (model_type "deberta-v2"): BERT's post-norm layer whose attention scores add
disentangled relative-position terms (content-to-position and position-to-content, ops/disentangled.py)
over a table of relative embeddings shared by every layer (with its own LayerNorm in v3); v3 has no
absolute positions and no token types. Classification: ContextPooler (dense + GELU on the first token),
then `classifier`.

Not loaded (each named by a ValueError): the convolution after the first layer (conv_kernel_size, the
v2-xlarge/xxlarge checkpoints), separate position projections (share_att_key false), an embedding size
other than the hidden size, attention_head_size other than hidden / heads, no relative attention."""
from __future__ import annotations

from ..config import EncoderConfig
from ..loaders.keymap import KeyMap, Rule, module_rules
from ..ops.disentangled import POS_ATT_TYPES, REL_NORMS, DisentangledConfig
from .base import Family, TO_HF_ACTIVATIONS, classification_labels, hf_activation
from .bert import BERT_FFN_MODULES

_L = "encoder.layer.{i}."
_A = _L + "attention.self."
LAYER_RULES = module_rules({
    "layers.{i}.qkv": tuple(_A + f"{p}_proj" for p in ("query", "key", "value")),
    "layers.{i}.out": _L + "attention.output.dense",
    "layers.{i}.norm1": _L + "attention.output.LayerNorm",
    **BERT_FFN_MODULES,
})
# ContextPooler (pooler.dense, then pooler_hidden_act) and the classifier
HEAD_RULES = [
    Rule.of("head.dense.weight", "pooler.dense.weight"), Rule.of("head.dense.bias", "pooler.dense.bias"),
    Rule.of("head.out.weight", "classifier.weight"), Rule.of("head.out.bias", "classifier.bias"),
]
# the position-id buffer and the pre-training heads (MLM, replaced-token detection) of released checkpoints
UNUSED = ["embeddings.position_ids", "lm_predictions.*", "mask_predictions.*", "cls.*", "lm_head.*"]


def keymap(cfg: EncoderConfig, with_head: bool) -> KeyMap:
    rules = [Rule.of("embeddings.word.weight", "embeddings.word_embeddings.weight"),
             Rule.of("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
             Rule.of("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
             Rule.of("rel_embeddings.weight", "encoder.rel_embeddings.weight")]
    ignore = list(UNUSED)
    if cfg.position_embedding == "absolute":
        rules.append(Rule.of("embeddings.position.weight", "embeddings.position_embeddings.weight"))
    else:   # v3 checkpoints carry an absolute table that position_biased_input=false leaves unused
        ignore.append("embeddings.position_embeddings.*")
    if cfg.type_vocab_size > 0:
        rules.append(Rule.of("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"))
    if cfg.disentangled.norm_rel_ebd == "layer_norm":
        rules += [Rule.of("rel_norm.weight", "encoder.LayerNorm.weight"),
                  Rule.of("rel_norm.bias", "encoder.LayerNorm.bias")]
    if not with_head:
        ignore += ["pooler.*", "classifier.*"]
    return KeyMap(rules + LAYER_RULES + (HEAD_RULES if with_head else []), ignore=ignore)


def _types(value) -> list[str]:
    """A '|'-separated string or a list -> lower-case names, as DebertaV2Config reads them."""
    items = value.split("|") if isinstance(value, str) else list(value or [])
    return [str(x).strip().lower() for x in items if str(x).strip()]


def config_from_hf(d: dict) -> EncoderConfig:
    h, heads = d["hidden_size"], d["num_attention_heads"]

    def reject(key: str, why: str):
        raise ValueError(f"unsupported DeBERTa-v2 option {key}={d.get(key)!r}: {why}")

    if not d.get("relative_attention", False):
        reject("relative_attention", "packformer loads DeBERTa with its disentangled relative attention only")
    if d.get("conv_kernel_size", 0) and d["conv_kernel_size"] > 0:
        reject("conv_kernel_size", "the convolution after the first layer (DeBERTa-v2 xlarge/xxlarge) is not "
                                   "implemented")
    if d.get("embedding_size", h) != h:
        reject("embedding_size", f"embeddings must have the hidden size {h} (no embed_proj)")
    if d.get("attention_head_size", h // heads) != h // heads:
        reject("attention_head_size", f"the head size must be hidden_size / num_attention_heads = {h // heads}")
    if not d.get("share_att_key", False):
        reject("share_att_key", "separate position projections (pos_key_proj / pos_query_proj) are not "
                                "implemented; DeBERTa-v2 and v3 share the attention keys")
    types = _types(d.get("pos_att_type"))
    if [t for t in types if t not in POS_ATT_TYPES]:
        reject("pos_att_type", f"supported terms: {'|'.join(POS_ATT_TYPES)}")
    norms = _types(d.get("norm_rel_ebd", "none"))
    if [n for n in norms if n not in REL_NORMS]:
        reject("norm_rel_ebd", f"supported: {' or '.join(REL_NORMS)}")
    num_labels, id2label = classification_labels(d)
    if num_labels:
        if d.get("pooler_hidden_size", h) != h:
            reject("pooler_hidden_size", f"the pooler must have the hidden size {h}")
        if d.get("pooler_hidden_act", "gelu") not in ("gelu", "gelu_python"):
            reject("pooler_hidden_act", "the ContextPooler is loaded with (erf) GELU only")
    max_pos = d.get("max_position_embeddings", 512)
    max_rel = d.get("max_relative_positions") or -1          # < 1: max_position_embeddings, as transformers
    dis = DisentangledConfig(position_buckets=int(d.get("position_buckets") or -1),
                             max_relative_positions=int(max_rel if max_rel >= 1 else max_pos),
                             pos_att_type=tuple(types), share_att_key=True,
                             norm_rel_ebd="layer_norm" if "layer_norm" in norms else "none")
    pad = d.get("pad_token_id")
    return EncoderConfig(
        vocab_size=d["vocab_size"], hidden_size=h, num_layers=d["num_hidden_layers"], num_heads=heads,
        intermediate_size=d["intermediate_size"], max_position_embeddings=max_pos,
        type_vocab_size=d.get("type_vocab_size", 0), layer_norm_eps=d.get("layer_norm_eps", 1e-7),
        activation=hf_activation(d.get("hidden_act", "gelu")), pad_token_id=0 if pad is None else int(pad),
        position_embedding="absolute" if d.get("position_biased_input", True) else "none",
        disentangled=dis, model_type="deberta-v2", family="deberta_v2", num_labels=num_labels, id2label=id2label,
    )


def to_hf_config(cfg: EncoderConfig):
    from transformers import DebertaV2Config

    dis = cfg.disentangled
    odd = {k: v for k, v in dict(norm_first=cfg.norm_first, final_layer_norm=cfg.final_layer_norm,
                                 embedding_layer_norm=cfg.embedding_layer_norm, position_offset=cfg.position_offset,
                                 rotary=cfg.rotary, relative_bias=cfg.relative_bias, local_window=cfg.local_window,
                                 ffn_kind=cfg.ffn_kind, linear_bias=cfg.linear_bias, norm_bias=cfg.norm_bias).items()
           if v != getattr(EncoderConfig(), k)}
    if dis is None or odd:
        raise ValueError(f"transformers' DebertaV2Model cannot reproduce this encoder: "
                         f"{'it has no disentangled attention' if dis is None else f'it differs in {odd}'}")
    return DebertaV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=TO_HF_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        relative_attention=True, position_buckets=dis.position_buckets,
        max_relative_positions=dis.max_relative_positions, pos_att_type="|".join(dis.pos_att_type),
        share_att_key=True, norm_rel_ebd=dis.norm_rel_ebd,
        position_biased_input=cfg.position_embedding == "absolute", pooler_hidden_act="gelu",
        num_labels=max(cfg.num_labels, 1))


def _v3(hidden: int, layers: int, heads: int, ffn: int) -> EncoderConfig:
    return EncoderConfig(vocab_size=128100, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7,
                         position_embedding="none", disentangled=DisentangledConfig(256, 512),
                         model_type="deberta-v2", family="deberta_v2")


FAMILY = Family(
    name="deberta_v2", model_types=("deberta-v2",), config_from_hf=config_from_hf, keymap=keymap,
    to_hf_config=to_hf_config, hf_head_keys=("pooler.", "classifier."), head_act="gelu",
    presets={"deberta-v3-base": _v3(768, 12, 12, 3072), "deberta-v3-large": _v3(1024, 24, 16, 4096)},
    reference="transformers DebertaV2Model / DebertaV2ForSequenceClassification (DisentangledSelfAttention)",
)
