"""Encoder configuration: one dataclass states what differs between encoder families, plus presets.

Everything a family changes in the layer (norm placement, position scheme, attention window, feed-forward
kind, biases) is a field here; the one layer dataflow (dataflow.py) reads them through the layers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
POSITION_EMBEDDINGS = ("absolute", "none")
FFN_KINDS = ("mlp", "glu")
NORM_KINDS = ("layer", "rms")


# the integer fields of EncoderConfig that must be positive (every `int` field must be an int)
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")


@dataclass(frozen=True)
class RelativeBuckets:
    """T5-style bidirectional relative-position buckets (MPNet): exact up to num_buckets/4 tokens apart,
    then log-spaced up to `max_distance`, beyond which every distance shares the last bucket."""

    num_buckets: int = 32
    max_distance: int = 128

    def buckets(self, rel):
        """rel = key position - query position (an int64 tensor) -> bucket index, as transformers' MPNet."""
        import math

        import torch

        half = self.num_buckets // 2
        n = -rel
        ret = (n < 0).long() * half
        n = n.abs()
        max_exact = half // 2
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (half - max_exact)).long()
        large = large.clamp(max=half - 1)
        return ret + torch.where(n < max_exact, n, large)


@dataclass
class EncoderConfig:
    """Shape and conventions of one encoder.

    `position_offset` is the first position id: 0 for BERT, `pad_token_id + 1` for RoBERTa/XLM-R
    (fairseq numbers positions after the padding index).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2          # 0 or 1 means no token-type embedding is used
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0
    norm_first: bool = False          # pre-norm layers (nn.TransformerEncoder norm_first=True)
    embedding_layer_norm: bool = True
    final_layer_norm: bool = False    # a LayerNorm after the last layer (pre-norm stacks)
    first_attention_norm: bool = True  # pre-norm: False = layer 0 attends to the embeddings as they are (ModernBERT)
    position_embedding: str = "absolute"   # "absolute" (a learned table) or "none" (rotary / relative only)
    rotary: Any = None                # ops.rotary.RotaryConfig of every layer (or of the global ones), or None
    rotary_local: Any = None          # ... of the local-window layers when their base differs (ModernBERT)
    relative_bias: RelativeBuckets | None = None   # a learned per-head bias of bucketed distances (MPNet)
    disentangled: Any = None          # ops.disentangled.DisentangledConfig: DeBERTa's c2p / p2c relative attention
    local_window: int = 0             # > 0: local layers attend to |i - j| <= local_window only
    global_every: int = 0             # with local_window: layer i is global when i % global_every == 0
    ffn_kind: str = "mlp"             # "mlp": act(x W1) W2; "glu": (act(x Wg) * x Wu) W2, W1 = [Wg; Wu]
    linear_bias: bool = True          # False: the family has no Linear biases (kept as zeros)
    norm_bias: bool = True            # False: LayerNorms without bias (kept as zeros)
    model_type: str = "bert"
    family: str = "bert"              # the families/ module that maps this model (families.FAMILIES key)
    num_labels: int = 0               # >0: a classification head is attached
    id2label: dict[int, str] = field(default_factory=dict)
    head_pooling: str = ""            # the head's pooling where each model states it (ModernBERT); "": the family's
    head_bias: bool = True            # False: the head's dense layer has no bias (kept zero)
    # decoder-style encoders (Qwen3, Gemma 3): each field's default is the BERT-style behaviour
    norm_kind: str = "layer"          # "layer" (LayerNorm) or "rms" (RMSNorm: w * x / rms(x), no bias)
    head_size: int = 0                # dims per attention head; 0: hidden_size // num_heads
    num_kv_heads: int = 0             # key/value heads (grouped-query attention); 0: num_heads
    qk_norm: bool = False             # an RMSNorm over each q and k head (head_size dims) before rotary
    sandwich_norm: bool = False       # pre-norm + a norm of each sublayer's output before its residual add
    causal: bool = False              # query i attends to keys j <= i of its own sequence only
    attention_scale: float = 0.0      # the scores' scale; 0: 1 / sqrt(head_size)
    embedding_scale: float = 1.0      # the word embeddings times this (rounded to their dtype, as Gemma)
    global_offset: int = 0            # with global_every: layer i is global when (i - offset) % global_every == 0
    adapters: Any = None              # lora.LoraAdapters: per-task LoRA deltas of every Linear and embedding (Jina v3)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):   # a config.json value of the wrong type would fail deep inside
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{f.name} must be an integer, got {v!r}")
        for name in POSITIVE_SIZES:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.head_size < 0 or self.num_kv_heads < 0:
            raise ValueError(f"head_size ({self.head_size}) and num_kv_heads ({self.num_kv_heads}) must be >= 0")
        if not self.head_size and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind {self.norm_kind!r} is not one of {NORM_KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding {self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}")
        if self.ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind {self.ffn_kind!r} is not one of {FFN_KINDS}")
        if self.local_window < 0 or self.global_every < 0:
            raise ValueError(f"local_window ({self.local_window}) and global_every ({self.global_every}) must be >= 0")
        if isinstance(self.rotary, dict) or isinstance(self.rotary_local, dict):
            from .ops.rotary import RotaryConfig
            if isinstance(self.rotary, dict):
                self.rotary = RotaryConfig(**self.rotary)
            if isinstance(self.rotary_local, dict):
                self.rotary_local = RotaryConfig(**self.rotary_local)
        if isinstance(self.relative_bias, dict):
            self.relative_bias = RelativeBuckets(**self.relative_bias)
        if isinstance(self.disentangled, dict):
            from .ops.disentangled import DisentangledConfig
            self.disentangled = DisentangledConfig(**self.disentangled)
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if isinstance(self.adapters, dict):
            from .lora import LoraAdapters
            self.adapters = LoraAdapters(**self.adapters)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def qkv_size(self) -> int:
        """Rows of the fused projection [q; k; v]: (heads + 2 kv heads) x head dims."""
        return (self.num_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def scale(self) -> float:
        """The attention scores' scale."""
        return self.attention_scale or 1.0 / self.head_dim ** 0.5

    def is_local(self, layer: int) -> bool:
        return self.local_window > 0 and not (self.global_every
                                              and (layer - self.global_offset) % self.global_every == 0)

    def window_of_layer(self, layer: int) -> int:
        """The attention half-width of layer `layer` (0: the whole sequence)."""
        return self.local_window if self.is_local(layer) else 0

    def rotary_of_layer(self, layer: int):
        if self.is_local(layer) and self.rotary_local is not None:
            return self.rotary_local
        return self.rotary

    def rotary_configs(self) -> list:
        """The distinct rotary settings the layers use (one cos/sin table each per forward)."""
        return list(dict.fromkeys(r for r in (self.rotary_of_layer(i) for i in range(self.num_layers)) if r))

    @property
    def max_tokens_per_sequence(self) -> int:
        """Longest sequence (special tokens included) the position table can hold."""
        return self.max_position_embeddings - self.position_offset

    def regular_id_range(self) -> tuple[int, int]:
        """[lo, hi) of token ids that are not special: BERT vocabularies (DistilBERT's too) keep [PAD],
        [unused*], [UNK], [CLS], [SEP], [MASK] below 999; fairseq/RoBERTa ones keep <s>, <pad>, </s>, <unk>
        at 0-3 and <mask> last. Random ids in this range make calibration and benchmark batches."""
        if self.model_type in ("bert", "distilbert"):
            lo = 999 if self.vocab_size > 2000 else max(self.pad_token_id + 1, 4)
            hi = self.vocab_size
        else:
            lo, hi = 4, self.vocab_size - 1
        if hi - lo < 2:
            raise ValueError(f"vocabulary of {self.vocab_size} ids is too small for random non-special token ids")
        return lo, hi

    def architecture(self) -> dict[str, Any]:
        """What the layers do, in a few words per aspect (for `packformer info` and the server's /info)."""
        if self.position_embedding == "absolute":
            pos = ["absolute (learned)"]
        else:
            pos = []
        if self.rotary is not None:
            pos.append(f"rotary (base {self.rotary.base:g}"
                       + (f", local base {self.rotary_local.base:g}" if self.rotary_local is not None else "") + ")")
        if self.relative_bias is not None:
            pos.append(f"relative bias ({self.relative_bias.num_buckets} buckets)")
        if self.disentangled is not None:
            pos.append(f"disentangled relative ({'+'.join(self.disentangled.pos_att_type)}, "
                       f"{2 * self.disentangled.span} relative embeddings)")
        attn = "global"
        if self.local_window:
            attn = (f"+-{self.local_window} window" + (f", global every {self.global_every} layers"
                                                        if self.global_every else ""))
        if self.causal:
            attn = "causal" + ("" if attn == "global" else f", {attn}")
        if self.kv_heads != self.num_heads:
            attn += f", {self.kv_heads} kv heads"
        norm = ("pre" if self.norm_first else "post") + (" + post-sublayer" if self.sandwich_norm else "")
        norm += ", RMSNorm" if self.norm_kind == "rms" else ""
        norm += ", q/k norm" if self.qk_norm else ""
        out = {"norm": norm, "positions": " + ".join(pos) or "none",
               "attention": attn, "ffn": f"{'GLU' if self.ffn_kind == 'glu' else 'MLP'} ({self.activation})",
               "biases": self.linear_bias}
        if self.adapters is not None:
            out["adapters"] = f"LoRA rank {self.adapters.rank} x {len(self.adapters.tasks)} tasks"
        return out

    def labels(self) -> list[str]:
        return [self.id2label.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    def replace(self, **changes: Any) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_ROBERTA = dict(pad_token_id=1, position_offset=2, layer_norm_eps=1e-5, type_vocab_size=1)

PRESETS: dict[str, EncoderConfig] = {
    "minilm-l6": EncoderConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "roberta-base": EncoderConfig(vocab_size=50265, max_position_embeddings=514, model_type="roberta", **_ROBERTA),
    "xlmr-base": EncoderConfig(vocab_size=250002, max_position_embeddings=514, model_type="xlm-roberta", **_ROBERTA),
    "xlmr-large": EncoderConfig(vocab_size=250002, hidden_size=1024, num_layers=24, num_heads=16,
                                intermediate_size=4096, max_position_embeddings=514, model_type="xlm-roberta",
                                **_ROBERTA),
}


def preset(name: str, **changes: Any) -> EncoderConfig:
    """A copy of a named preset (those above and every family's, families/), with optional field overrides."""
    from . import families  # noqa: F401  (registers the families' presets in PRESETS)

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**changes)
