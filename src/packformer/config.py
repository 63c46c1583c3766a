"""Encoder configuration: one dataclass for every post-norm BERT-family encoder, plus named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


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
    model_type: str = "bert"
    num_labels: int = 0               # >0: a classification head is attached
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens_per_sequence(self) -> int:
        """Longest sequence (special tokens included) the position table can hold."""
        return self.max_position_embeddings - self.position_offset

    def regular_id_range(self) -> tuple[int, int]:
        """[lo, hi) of token ids that are not special: BERT vocabularies keep [PAD], [unused*], [UNK],
        [CLS], [SEP], [MASK] below 999; fairseq/RoBERTa ones keep <s>, <pad>, </s>, <unk> at 0-3 and
        <mask> last. Random ids in this range make calibration and benchmark batches."""
        if self.model_type == "bert":
            lo = 999 if self.vocab_size > 2000 else max(self.pad_token_id + 1, 4)
            hi = self.vocab_size
        else:
            lo, hi = 4, self.vocab_size - 1
        if hi - lo < 2:
            raise ValueError(f"vocabulary of {self.vocab_size} ids is too small for random non-special token ids")
        return lo, hi

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
    """A copy of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**changes)
