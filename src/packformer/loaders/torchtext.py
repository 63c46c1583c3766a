"""torchtext XLM-R state dicts (`.pt`), as `torchtext.models.XLMR_BASE_ENCODER` / `XLMR_LARGE_ENCODER` load them.

The file is a plain state dict of a `torchtext.models.RobertaModel` (torch.hub's
`load_state_dict_from_url` + `model.load_state_dict(state_dict)`, no wrapper dict). Its layers come in
three spellings, all from pytorch/text `torchtext/models/roberta/modules.py`:

- "current":  `encoder.transformer.layers.layers.{i}.self_attn.in_proj_weight`, `linear1`, `norm1`, ...
  (the stack is a `torch.nn.TransformerEncoder`);
- "legacy":   `encoder.transformer.layers.{i}.attention.input_projection`, `residual_mlp.mlp.0`/`.3`,
  `attention_layer_norm`, `final_layer_norm` (torchtext's own layer; the published .pt files use it);
- "better_transformer": `encoder.transformer.layers.{i}.better_transformer.self_attn...` (a short-lived
  wrapper around `nn.TransformerEncoderLayer`, same sub-names as "current").

Why our post-norm `Encoder` computes the same function (checked against torchtext's code):
- embeddings: token + position, positions = cumsum(non-pad) + pad_index, i.e. 2, 3, ... for pad 1
  (our `position_offset=2`); no token types; `embedding_layer_norm` is applied to the embeddings
  because XLM-R uses `normalize_before=False` (with True torchtext would apply it after the last layer
  instead, a layout these files do not use and we do not load);
- each layer: x = norm1(x + attn(x)); x = norm2(x + W2 gelu(W1 x)) (exact GELU, LayerNorm eps 1e-5).
  The legacy attention scales q by `scaling = 1/sqrt(head_dim)` (RobertaEncoder's default), as
  `nn.MultiheadAttention` does; both split `in_proj` rows as [q; k; v], our fused `qkv` layout;
- padded positions are masked out as keys and never read back, so packing drops them exactly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import PRESETS, EncoderConfig
from ..heads import ClassificationHead, Pooler
from ..model import Encoder
from ..tokenize import SentencePieceTokenizer
from .keymap import CheckpointError, KeyMap, Rule
from .parts import ModelParts, assemble

PAD_ID = 1                      # RobertaEncoderConf.padding_idx
POSITION_OFFSET = PAD_ID + 1    # fairseq positions
LAYER_NORM_EPS = 1e-5           # nn.LayerNorm / nn.TransformerEncoderLayer default
# tokens per sequence, <s> and </s> included: the bundles' transforms use T.Truncate(254) / T.Truncate(510)
PRESET_MAX_SEQ_LEN = {"xlmr-base": 256, "xlmr-large": 512}
HIDDEN_MAX_SEQ_LEN = {768: 256, 1024: 512}
ANCHOR = "transformer.token_embedding.weight"

# sublayer names per scheme: packformer layer parameter -> checkpoint name under the layer prefix
_CURRENT_LAYER = {
    "qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias",
    "out.weight": "self_attn.out_proj.weight", "out.bias": "self_attn.out_proj.bias",
    "ffn1.weight": "linear1.weight", "ffn1.bias": "linear1.bias",
    "ffn2.weight": "linear2.weight", "ffn2.bias": "linear2.bias",
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
}
_LEGACY_LAYER = {
    "qkv.weight": "attention.input_projection.weight", "qkv.bias": "attention.input_projection.bias",
    "out.weight": "attention.output_projection.weight", "out.bias": "attention.output_projection.bias",
    "ffn1.weight": "residual_mlp.mlp.0.weight", "ffn1.bias": "residual_mlp.mlp.0.bias",
    "ffn2.weight": "residual_mlp.mlp.3.weight", "ffn2.bias": "residual_mlp.mlp.3.bias",
    "norm1.weight": "attention_layer_norm.weight", "norm1.bias": "attention_layer_norm.bias",
    "norm2.weight": "final_layer_norm.weight", "norm2.bias": "final_layer_norm.bias",
}
# scheme -> (layer prefix under `transformer.`, with {i}; sublayer names)
SCHEMES: dict[str, tuple[str, dict[str, str]]] = {
    "current": ("layers.layers.{i}.", _CURRENT_LAYER),
    "legacy": ("layers.{i}.", _LEGACY_LAYER),
    "better_transformer": ("layers.{i}.better_transformer.", _CURRENT_LAYER),
}
_EMBEDDINGS = {
    "embeddings.word.weight": "token_embedding.weight",
    "embeddings.position.weight": "positional_embedding.embedding.weight",
    "embeddings.norm.weight": "embedding_layer_norm.weight",
    "embeddings.norm.bias": "embedding_layer_norm.bias",
}
_HEAD = {"head.dense.weight": "dense.weight", "head.dense.bias": "dense.bias",
         "head.out.weight": "out_proj.weight", "head.out.bias": "out_proj.bias"}


def torchtext_keymap(scheme: str, with_head: bool, prefix: str = "encoder.") -> KeyMap:
    """The key map for one naming scheme. `prefix` is what precedes `transformer.` ("encoder." in a
    RobertaModel state dict); the head sits beside the encoder (`head.` in a RobertaModel)."""
    layer_prefix, layer = SCHEMES[scheme]
    t = prefix + "transformer."
    rules = [Rule.of(ours, t + theirs) for ours, theirs in _EMBEDDINGS.items()]
    rules += [Rule.of("layers.{i}." + ours, t + layer_prefix + theirs) for ours, theirs in layer.items()]
    if with_head:
        hp = _head_prefix(prefix)
        rules += [Rule.of(ours, hp + theirs) for ours, theirs in _HEAD.items()]
    return KeyMap(rules)


def _head_prefix(prefix: str) -> str:
    return (prefix[: -len("encoder.")] if prefix.endswith("encoder.") else prefix) + "head."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True); anything but a flat {name: tensor} dict is refused with what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"torchtext checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled nn.Module, a zip of something else, a truncated file ...
        raise CheckpointError(f"{path} could not be read as a state dict with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. packformer loads "
                              "state dicts (torch.save(model.state_dict(), path)), not pickled modules") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict {{name: tensor}}")
    odd = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path} is not a flat state dict: entries that are not tensors: {', '.join(odd[:10])}"
                              f"{' ...' if len(odd) > 10 else ''}. torchtext's XLM-R files are plain "
                              "RobertaModel state dicts; save one with torch.save(model.state_dict(), path)")
    return dict(state)


def find_prefix(state: Mapping[str, torch.Tensor], what: str) -> str:
    """What precedes `transformer.token_embedding.weight` ("encoder." in a RobertaModel state dict)."""
    hits = [k[: -len(ANCHOR)] for k in state if k.endswith(ANCHOR) and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))]
    if len(hits) != 1:
        hint = ""
        if any("word_embeddings" in k for k in state):
            hint = " (this looks like a Hugging Face state dict: load its model folder instead)"
        raise CheckpointError(f"{what} is not a torchtext XLM-R state dict{hint}: expected one key "
                              f"'encoder.{ANCHOR}', found {len(hits)}; first keys: {', '.join(list(state)[:8])}")
    return hits[0]


def detect_scheme(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, int]:
    """Which naming scheme the layers use (the one most keys follow) and how many layers there are."""
    best, best_count, best_layers = "current", 0, 0
    for scheme, (layer_prefix, layer) in SCHEMES.items():
        pattern = re.compile(re.escape(prefix + "transformer." + layer_prefix).replace(r"\{i\}", r"(\d+)")
                             + "(.+)$")
        matches = [m for m in map(pattern.match, state) if m and m.group(2) in layer.values()]
        if len(matches) > best_count:
            best, best_count = scheme, len(matches)
            best_layers = 1 + max(int(m.group(1)) for m in matches)
    return best, best_layers


def _shape(state: Mapping[str, torch.Tensor], key: str, what: str,
           default: tuple[int, int] | None = None) -> tuple[int, int]:
    if key not in state and default is not None:
        return default
    if key not in state or state[key].dim() != 2:
        found = tuple(state[key].shape) if key in state else "missing"
        raise CheckpointError(f"{what}: cannot read the model's sizes: {key} must be a 2-d tensor, found {found}")
    return tuple(state[key].shape)


def _infer_heads(hidden: int, num_heads: int | None, preset: str | None, what: str) -> int:
    if num_heads is not None:
        heads = num_heads
    elif preset is not None:
        heads = PRESETS[preset].num_heads
    elif hidden % 64 == 0:
        heads = hidden // 64      # XLM-R base 768/12 and large 1024/16 both use head_dim 64
    else:
        raise ValueError(f"{what}: cannot infer the number of attention heads for hidden size {hidden} "
                         "(not a multiple of 64); pass num_heads=... or preset=...")
    if heads <= 0 or hidden % heads:
        raise ValueError(f"{what}: hidden size {hidden} is not divisible by num_heads={heads}")
    return heads


def _check_preset(preset: str, cfg: EncoderConfig, what: str) -> None:
    p = PRESETS[preset]
    fields = ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "max_position_embeddings")
    diff = [f"{f} {getattr(p, f)} (checkpoint: {getattr(cfg, f)})" for f in fields if getattr(p, f) != getattr(cfg, f)]
    if diff:
        raise ValueError(f"{what} does not have the shape of preset {preset!r}: expected {'; '.join(diff)}")


def _max_seq_len(cfg: EncoderConfig, preset: str | None, max_seq_len: int | None, what: str) -> int:
    capacity = cfg.max_tokens_per_sequence
    if max_seq_len is None:
        n = PRESET_MAX_SEQ_LEN.get(preset or "", HIDDEN_MAX_SEQ_LEN.get(cfg.hidden_size, capacity))
        return min(n, capacity)
    if not 2 < max_seq_len <= capacity:
        raise ValueError(f"{what}: max_seq_len={max_seq_len} must be in [3, {capacity}]: it counts tokens per "
                         f"sequence with <s> and </s>, and the position table holds {cfg.max_position_embeddings} "
                         f"rows minus the offset {cfg.position_offset} (torchtext's RobertaEncoderConf.max_seq_len "
                         "is that table size; it is read from the weights)")
    return max_seq_len


def load_torchtext(path: str | Path, spm: str | Path | None = None, num_classes: int | None = None,
                   preset: str | None = None, num_heads: int | None = None,
                   max_seq_len: int | None = None) -> ModelParts:
    """Load a torchtext XLM-R `.pt` state dict (with an optional RobertaClassificationHead).

    Sizes (vocab, hidden, layers, ffn, positions) come from the tensors; the head count cannot, so it
    comes from `num_heads`, else `preset` ("xlmr-base" 12, "xlmr-large" 16), else hidden // 64.
    `spm` is the sentencepiece model (xlmr.sentencepiece.bpe.model); without it the model takes token
    ids only. `max_seq_len` counts tokens with <s> and </s>: default 256 for base and 512 for large, as
    the bundles' transforms truncate content to 254 / 510. `num_classes`, if given, must match the head.
    """
    path = Path(path)
    what = f"torchtext checkpoint {path}"
    if preset is not None and preset not in PRESET_MAX_SEQ_LEN:
        raise ValueError(f"unknown torchtext preset {preset!r}; known: {', '.join(PRESET_MAX_SEQ_LEN)}")
    state = read_state_dict(path)
    prefix = find_prefix(state, what)
    scheme, num_layers = detect_scheme(state, prefix)
    if num_layers == 0:
        raise CheckpointError(f"{what} has no encoder layers under '{prefix}transformer.layers.': expected keys "
                              f"like '{prefix}transformer.layers.layers.0.self_attn.in_proj_weight' (current) or "
                              f"'{prefix}transformer.layers.0.attention.input_projection.weight' (legacy)")
    # Sizes come from the tensors. A missing size-giving tensor gets a placeholder: the key map check
    # below then fails and names it together with every other missing or unused key.
    t = prefix + "transformer."
    layer_prefix, layer = SCHEMES[scheme]
    vocab, hidden = _shape(state, t + _EMBEDDINGS["embeddings.word.weight"], what)
    positions = _shape(state, t + _EMBEDDINGS["embeddings.position.weight"], what, (2 + 512, hidden))[0]
    ffn_keys = [t + layer_prefix.format(i=i) + layer["ffn1.weight"] for i in range(num_layers)]
    ffn = _shape(state, next((k for k in ffn_keys if k in state), ffn_keys[0]), what, (4 * hidden, hidden))[0]

    hp = _head_prefix(prefix)
    num_labels = 0
    if any(k.startswith(hp) for k in state):   # RobertaClassificationHead: classes = rows of out_proj
        out = state.get(hp + _HEAD["head.out.weight"], state.get(hp + _HEAD["head.out.bias"]))
        num_labels = out.shape[0] if out is not None and out.dim() >= 1 else 1
    if num_classes is not None and num_classes != num_labels:
        found = f"a head with {num_labels} classes" if num_labels else "no classification head (no 'head.*' keys)"
        raise CheckpointError(f"{what}: num_classes={num_classes} was asked for, but the checkpoint has {found}")

    heads = _infer_heads(hidden, num_heads, preset, what)
    cfg = EncoderConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=num_layers, num_heads=heads, intermediate_size=ffn,
        max_position_embeddings=positions, type_vocab_size=0, layer_norm_eps=LAYER_NORM_EPS, activation="gelu",
        pad_token_id=PAD_ID, position_offset=POSITION_OFFSET, model_type="xlm-roberta", num_labels=num_labels,
    )
    encoder, head = assemble(lambda: (Encoder(cfg), ClassificationHead(hidden, num_labels, act="relu") if num_labels
                                      else None), torchtext_keymap(scheme, bool(num_labels), prefix), state,
                             num_layers, what=f"{what} ({scheme} torchtext names)")
    if preset is not None:
        _check_preset(preset, cfg, what)
    max_len = _max_seq_len(cfg, preset, max_seq_len, what)

    tok = None
    if spm is not None:
        tok = SentencePieceTokenizer(spm)
        if tok.vocab_size > vocab:
            raise ValueError(f"sentencepiece model {spm} has {tok.vocab_size - 1} pieces, giving ids up to "
                             f"{tok.vocab_size - 1}, but {path} has a vocabulary of {vocab}: they do not belong "
                             "together")
    return ModelParts(config=cfg, encoder=encoder, head=head, pooler=Pooler("mean", normalize=False),
                      tokenizer=tok, max_seq_length=max_len, source=str(path), format="torchtext")


__all__ = ["load_torchtext", "torchtext_keymap", "detect_scheme", "read_state_dict", "SCHEMES", "CheckpointError"]
