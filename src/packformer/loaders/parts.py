"""What every loader returns: the pieces of a model, before device and dtype are chosen."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import EncoderConfig
from ..heads import ClassificationHead, Pooler
from ..model import Encoder
from ..outputs import OutputConfig

log = logging.getLogger(__name__)


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


def assemble(make: Callable[[], tuple[Encoder, ClassificationHead | None]], keymap, state: dict, num_layers: int,
             what: str) -> tuple[Encoder, ClassificationHead | None]:
    """The encoder (and head) that `make` builds, holding the checkpoint's own tensors.

    The modules are built on the meta device (no memory, no random initialisation) and the converted
    checkpoint tensors are assigned to them, not copied: a 151k x 1024 embedding is in memory once, in
    the checkpoint's dtype (Model casts to the run's dtype). A parameter the key map leaves unfilled
    (an optional one the checkpoint lacks) becomes zeros, with a warning."""
    with torch.device("meta"):
        encoder, head = make()
    view = param_view(encoder, head)
    params = keymap.convert(state, view, num_layers, what=what)
    view.load_state_dict(params, strict=False, assign=True)
    for path, module in view.named_modules():
        for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if t.is_meta:
                log.warning("%s has no value for %s: zeros", what, f"{path}.{name}" if path else name)
                zero = torch.zeros(t.shape, dtype=t.dtype)
                if isinstance(t, nn.Parameter):
                    setattr(module, name, nn.Parameter(zero, requires_grad=t.requires_grad))
                else:
                    module._buffers[name] = zero
    return encoder, head
