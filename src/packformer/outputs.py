"""What `encode()` does around the encoder, as sentence-transformers does it: prompts, Matryoshka
truncation and quantized embeddings.

- Prompts: a sentence-transformers folder's `config_sentence_transformers.json` names prompts
  (`prompts`, `default_prompt_name`); the prompt's text is prepended to every input. When the Pooling
  module says `include_prompt: false`, the prompt's tokens (the leading special token included, the
  trailing one not: ST's `_get_prompt_length`) are left out of pooling: on packed rows that is a
  per-sequence start offset (heads.pool's `skip`), never a mask over padding.
- Truncation (`truncate_dim`): the leading dimensions of the pooled (and, where the folder has a
  Normalize module, normalized) embedding; `normalize_embeddings=True` normalizes after the cut. This is
  SentenceTransformer.encode's order (Normalize module -> truncate -> normalize_embeddings), so a
  truncated embedding of a normalizing model is not unit length unless normalize_embeddings=True.
- Quantization (`precision`): sentence_transformers.quantization.quantize_embeddings' rules. int8/uint8
  take per-dimension [min, max] ranges from `ranges`, else from `calibration_embeddings`, else from the
  embeddings being quantized, i.e. from the call's own batch: then a text's codes depend on the other
  texts of the call (as in ST); pass `ranges` or `calibration_embeddings` for codes that do not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import read_json
from .tokenize import check_text

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
ST_CONFIG = "config_sentence_transformers.json"


@dataclass
class OutputConfig:
    """What a model folder says about encode()'s outputs (defaults: no prompts, no truncation)."""

    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True          # Pooling's include_prompt: False leaves the prompt out of pooling
    truncate_dim: int | None = None

    def __post_init__(self):
        # None prompt texts are placeholders: ST reads them as ""
        self.prompts = {str(k): ("" if v is None else v) for k, v in dict(self.prompts).items()}
        bad = [k for k, v in self.prompts.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"prompts must map names to strings; {bad} do not")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default prompt name {self.default_prompt_name!r} is not among the prompts "
                             f"{list(self.prompts)}")


def read_output_config(folder: str | Path, pooling_dir: str | Path | None = None) -> OutputConfig:
    """`config_sentence_transformers.json` (prompts, default_prompt_name, truncate_dim) and the Pooling
    module's `include_prompt` of a sentence-transformers folder; absent files give the defaults."""
    folder = Path(folder)
    st = {}
    p = folder / ST_CONFIG
    if p.exists():
        st = read_json(p)
    include = True
    if pooling_dir is not None and (Path(pooling_dir) / "config.json").exists():
        include = bool(read_json(Path(pooling_dir) / "config.json").get("include_prompt", True))
    dim = st.get("truncate_dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ValueError(f"{p}: truncate_dim must be a positive integer, got {dim!r}")
    try:
        return OutputConfig(prompts=st.get("prompts") or {}, default_prompt_name=st.get("default_prompt_name"),
                            include_prompt=include, truncate_dim=dim)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e


# ---- prompts ------------------------------------------------------------------------------------
def resolve_prompt(cfg: OutputConfig, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
    """SentenceTransformer's rule: `prompt` wins (a `prompt_name` beside it is ignored, with a warning);
    else the named prompt (ValueError listing the known names for an unknown one); else the default
    prompt; else None."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        check_text(prompt, "prompt")
        if prompt_name is not None:
            log.warning("Provide either a `prompt`, a `prompt_name`, or neither, but not both. "
                        "Ignoring the `prompt_name` in favor of `prompt`.")
        return prompt
    if prompt_name is not None:
        if prompt_name not in cfg.prompts:
            known = ", ".join(repr(k) for k in cfg.prompts) or "none: the model folder defines no prompts"
            raise ValueError(f"unknown prompt_name {prompt_name!r}; the model's prompts are: {known}")
        return cfg.prompts[prompt_name]
    if cfg.default_prompt_name is not None:
        return cfg.prompts.get(cfg.default_prompt_name)
    return None


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special token ids (transformers' `all_special_ids`)."""
    rust = getattr(tokenizer, "tok", None)
    if rust is not None and hasattr(rust, "get_added_tokens_decoder"):
        return {i for i, t in rust.get_added_tokens_decoder().items() if t.special}
    ids = {getattr(tokenizer, n) for n in ("BOS", "PAD", "EOS", "UNK") if hasattr(tokenizer, n)}
    return ids or {tokenizer.pad_id}


def prompt_length(tokenizer, prompt: str, max_length: int) -> int:
    """Tokens of `prompt` at the start of every prompted input, as ST counts them: the prompt tokenized
    alone (special tokens added, truncated to max_length), less its last token if that is special."""
    if not prompt:
        return 0
    ids = tokenizer.encode([prompt], max_length, True)[0]
    n = len(ids)
    if ids and ids[-1] in special_ids(tokenizer):
        n -= 1
    return n


def drop_prompt(hidden, cu_seqlens, skip: int, mode: str):
    """Packed rows without each sequence's first `skip` tokens (the prompt, for include_prompt=False):
    [T, H], [B+1] -> [T', H], [B+1], for the pooling `mode` that reads them next. As ST pools: a sequence
    no longer than `skip` is left empty (mean gives zeros, max -inf), except for cls pooling, which then
    reads its first token. (Prompted inputs end with a token after the prompt, so that needs a prompt
    that fills the whole input.)"""
    import torch

    if skip <= 0:
        return hidden, cu_seqlens
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]                                                  # [B]
    cut = lens.clamp(max=skip)
    if mode == "cls":
        cut = torch.where(lens > skip, cut, torch.zeros_like(cut))
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens,
                                  output_size=hidden.shape[0])               # [T]
    pos = torch.arange(hidden.shape[0], device=cu.device) - cu[:-1].index_select(0, seg)
    keep = pos >= cut.index_select(0, seg)                                   # [T]
    new_cu = torch.zeros_like(cu)
    new_cu[1:] = torch.cumsum(lens - cut, 0)
    return hidden[keep], new_cu.to(cu_seqlens.dtype)


# ---- truncation ---------------------------------------------------------------------------------
def check_truncate_dim(truncate_dim: int | None, dim: int) -> int | None:
    """None, or an int in [1, dim]; anything else raises naming the model's dimension."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
        raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
    if not 1 <= truncate_dim <= dim:
        raise ValueError(f"truncate_dim must be between 1 and the model's embedding dimension {dim}, "
                         f"got {truncate_dim}")
    return int(truncate_dim)


# ---- quantization -------------------------------------------------------------------------------
def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def quantization_ranges(embeddings: np.ndarray, calibration_embeddings: np.ndarray | None = None) -> np.ndarray:
    """[2, D]: per-dimension min and max of the calibration embeddings, else of the embeddings
    themselves (which needs more than one of them)."""
    ref = embeddings if calibration_embeddings is None else np.asarray(calibration_embeddings)
    if ref.ndim != 2 or ref.shape[1] != embeddings.shape[-1]:
        raise ValueError(f"calibration_embeddings must be [N, {embeddings.shape[-1]}], got {list(ref.shape)}")
    if calibration_embeddings is None and ref.shape[0] < 2:
        raise ValueError("int8/uint8 ranges cannot come from a single embedding: pass ranges= or "
                         "calibration_embeddings= from a representative set of embeddings")
    return np.vstack((ref.min(axis=0), ref.max(axis=0)))


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None,
             calibration_embeddings: np.ndarray | None = None) -> np.ndarray:
    """[N, D] float -> [N, D] float32 / int8 / uint8, or [N, ceil(D / 8)] int8 / uint8 bit-packed
    (binary, ubinary): sentence_transformers.quantization.quantize_embeddings, code for code."""
    check_precision(precision)
    emb = np.asarray(embeddings)
    if emb.dtype in (np.int8, np.uint8):
        raise TypeError("embeddings to quantize must be float, not already int8/uint8")
    if precision == "float32":
        return emb.astype(np.float32)
    if emb.ndim == 2 and emb.shape[0] == 0:
        d = emb.shape[1] if precision.endswith("int8") else (emb.shape[1] + 7) // 8
        return np.zeros((0, d), dtype=np.uint8 if precision.startswith("u") else np.int8)
    if precision.endswith("int8"):
        if ranges is None:
            ranges = quantization_ranges(emb, calibration_embeddings)
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        if ranges.shape != (2, emb.shape[-1]):
            raise ValueError(f"ranges must be [2, {emb.shape[-1]}] (per-dimension min and max), got {list(ranges.shape)}")
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((emb - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    bits = np.packbits(emb > 0, axis=-1)
    return bits if precision == "ubinary" else (bits - 128).astype(np.int8)


def apply(embeddings, truncate_dim: int | None, normalize: bool, precision: str = "float32",
          ranges: np.ndarray | None = None, calibration_embeddings: Sequence | np.ndarray | None = None):
    """encode()'s output steps after pooling, in ST's order: truncate, then normalize (if asked), then
    quantize. Takes and returns a torch tensor [N, D] for float32, a numpy array otherwise."""
    import torch

    if truncate_dim is not None:
        embeddings = embeddings[..., :truncate_dim]
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, p=2.0, dim=-1)
    if precision == "float32":
        return embeddings
    return quantize(embeddings.numpy(), precision, ranges, calibration_embeddings)
