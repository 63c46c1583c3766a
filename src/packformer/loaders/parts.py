"""What every loader returns: the pieces of a model, before device and dtype are chosen."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import EncoderConfig
from ..heads import ClassificationHead, Pooler
from ..model import Encoder
from ..outputs import OutputConfig


@dataclass
class ModelParts:
    config: EncoderConfig
    encoder: Encoder
    head: ClassificationHead | None
    pooler: Pooler
    tokenizer: object | None          # a packformer.tokenize.Tokenizer
    max_seq_length: int               # tokens per sequence, special tokens included
    source: str
    format: str                       # "huggingface" | "sentence-transformers" | "torchtext" | "random"
    output_config: OutputConfig = field(default_factory=OutputConfig)   # prompts, include_prompt, truncate_dim
    # extra heads on the packed rows, by output: "splade", "lexical" (packformer.sparse), "colbert" (multivector)
    outputs: dict[str, nn.Module] = field(default_factory=dict)


def param_view(encoder: Encoder, head: ClassificationHead | None) -> nn.Module:
    """One module whose state_dict names are the key maps' targets: the encoder's own names at the top
    level, the classification head under `head.`. It shares parameters with `encoder` and `head`."""
    view = nn.Module()
    for name, child in encoder.named_children():
        setattr(view, name, child)
    if head is not None:
        view.head = head
    return view
