"""Decoder rerankers (Qwen3-Reranker): score = P("yes") of the next token after a judging prompt.

The model card's recipe, on packed rows: each (query, document) becomes
    prefix + tokens("<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}") + suffix
with the body cut to `max_length - len(prefix) - len(suffix)` tokens; the Qwen3 body runs causally (families/
qwen3.py), the last token's final hidden state meets only the two LM-head rows of "no" and "yes" (never the
whole vocabulary: 151k rows), and the score is softmax([no, yes])[1]. The rows come from `lm_head.weight`
(read alone from the safetensors, two rows) or, with tied embeddings, from the word embeddings.

`DecoderReranker` is a rerank.CrossEncoderModel whose "head" (YesNoHead) gives one logit per pair, the
yes-minus-no logit difference: sigmoid(logit) = softmax([no, yes])[1] exactly, so predict / rank / raw
scores, `packformer rerank` and the server's rerank routes (pair_ids -> score_seqs) are the cross-encoder's.
packformer.load() picks it for a Qwen3 *ForCausalLM folder (no modules.json) whose tokenizer has single
"yes" and "no" tokens (`is_decoder_reranker_folder`), or for any Qwen3 folder with kind="reranker".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import read_json
from .heads import last_tokens
from .rerank import SIGMOID, CrossEncoderModel, CrossEncoderParts, PairSeq, check_pairs

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192          # the model card's max_length
FAMILIES = ("qwen3",)              # decoder families with a yes/no reranker recipe here
ANSWERS = ("no", "yes")            # the LM-head rows kept, in this order


def format_pair(query: str, document: str, instruction: str | None = None) -> str:
    """The text between the prefix and the suffix, as the model card writes it (None: its default
    instruction)."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


# ---- folders -------------------------------------------------------------------------------------------
def _config(folder: Path) -> dict:
    try:
        return read_json(folder / "config.json")
    except (OSError, json.JSONDecodeError):
        return {}


def _answer_ids(tok) -> list[int | None]:
    """Ids of the single "no" and "yes" tokens of a Rust tokenizer (None where a word is no one token)."""
    return [tok.token_to_id(t) for t in ANSWERS]


def is_decoder_reranker_folder(folder: str | Path) -> bool:
    """A Qwen3 *ForCausalLM folder (no sentence-transformers modules.json) whose tokenizer.json has single
    "yes" and "no" tokens: what Qwen3-Reranker ships."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "modules.json").exists() or not (folder / "tokenizer.json").exists():
        return False
    cfg = _config(folder)
    if not any(str(a).endswith("ForCausalLM") for a in cfg.get("architectures") or []):
        return False
    from .families import family_of
    try:
        if family_of(cfg).name not in FAMILIES:
            return False
    except ValueError:
        return False
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:                       # an unreadable tokenizer is for the loader to report
        return False
    return None not in _answer_ids(tok)


def _lm_head_rows(folder: Path, ids: list[int]) -> torch.Tensor | None:
    """Rows `ids` of lm_head.weight from the folder's safetensors, read alone; None where there is none
    (tied embeddings)."""
    from safetensors import safe_open

    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index)["weight_map"]
        files = [folder / wm[k] for k in ("lm_head.weight",) if k in wm]
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if "lm_head.weight" in st.keys():
                sl = st.get_slice("lm_head.weight")
                return torch.cat([sl[i:i + 1] for i in ids]).float()                    # [len(ids), H]
    if (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        if "lm_head.weight" in state:
            return state["lm_head.weight"][ids].float()
    return None


class YesNoHead(nn.Module):
    """The LM head cut to its "no" and "yes" rows: each sequence's last hidden state -> one logit, yes - no
    ([T, H] packed rows -> [B, 1] fp32), so that sigmoid(logit) = softmax([no, yes])[1]."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows.detach().float().clone())                       # [2, H]: no, yes

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        last = last_tokens(hidden.float(), cu_seqlens)                                     # [B, H]
        # a per-row product and sum, not a [B, H] @ [H, 2] GEMM, whose rounding varies with B: a pair's
        # score never depends on how many share its batch
        logits = (last[:, None, :] * self.rows).sum(-1)                                    # [B, 2]
        return (logits[:, 1] - logits[:, 0]).unsqueeze(1)                                  # [B, 1]


@dataclass
class DecoderRerankerParts(CrossEncoderParts):
    """CrossEncoderParts of a decoder reranker: the prompt's prefix / suffix ids around each pair's text and
    the default instruction (None: the model card's)."""

    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    instruction: str | None = None


def load_decoder_reranker_parts(folder: str | Path, max_length: int = DEFAULT_MAX_LENGTH,
                                instruction: str | None = None) -> DecoderRerankerParts:
    """A Qwen3 (*ForCausalLM) folder with its tokenizer.json -> DecoderRerankerParts (CPU, fp32); pairs are
    cut to `max_length` tokens, prompt included (capped at the model's positions)."""
    from .loaders.hf import load_hf
    from .loaders.parts import ModelParts

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a decoder reranker folder: config.json is missing")
    from .families import family_of

    d = _config(folder)
    try:
        family = family_of(d).name
    except ValueError:
        family = None
    if family not in FAMILIES:
        raise ValueError(f"{folder}: a decoder reranker needs a {' / '.join(FAMILIES)} model (a Qwen3-Reranker "
                         f"folder), got model_type {d.get('model_type')!r}")
    parts = load_hf(folder)
    tok = getattr(parts.tokenizer, "tok", None)
    if tok is None:
        raise ValueError(f"{folder}: a decoder reranker needs the folder's tokenizer.json")
    ids = _answer_ids(tok)
    if None in ids:
        raise ValueError(f"{folder}: the tokenizer has no single 'yes' / 'no' token, so it is not a yes/no reranker")
    rows = _lm_head_rows(folder, ids)
    if rows is None:                                   # tied: the word embeddings are the LM head
        rows = parts.encoder.embeddings.word.weight[ids].detach()
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids                        # noqa: E731
    prefix, suffix = enc(PREFIX), enc(SUFFIX)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    length = min(max_length, parts.config.max_tokens_per_sequence)
    if length <= len(prefix) + len(suffix):
        raise ValueError(f"max_length {max_length} leaves no room between the prompt's {len(prefix)} prefix "
                         f"and {len(suffix)} suffix tokens")
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    fields = {f: getattr(parts, f) for f in ModelParts.__dataclass_fields__}
    fields.update(head=YesNoHead(rows), max_seq_length=length, format="decoder-reranker")
    return DecoderRerankerParts(**fields, activation=SIGMOID, prefix=prefix, suffix=suffix, instruction=instruction)


# ---- the model -----------------------------------------------------------------------------------------
class DecoderReranker(CrossEncoderModel):
    """A loaded decoder reranker: CrossEncoderModel's predict / rank / logits / pair_ids / score_seqs, with
    the model card's prompt around each pair and an instruction (at load, or per call)."""

    def __init__(self, parts: DecoderRerankerParts, *args, **kwargs):
        if not isinstance(parts, DecoderRerankerParts):
            raise TypeError("DecoderReranker takes DecoderRerankerParts (load_decoder_reranker_parts)")
        super().__init__(parts, *args, **kwargs)
        self.prefix, self.suffix = parts.prefix, parts.suffix
        self.default_instruction = parts.instruction

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | None = "cpu", dtype: str | torch.dtype | None = None,
                    fast: bool | None = None, max_length: int = DEFAULT_MAX_LENGTH, instruction: str | None = None,
                    **load_kw) -> "DecoderReranker":
        """A Qwen3ForCausalLM folder (Qwen3-Reranker) with its tokenizer.json: packformer.load(folder,
        kind="reranker", ...)."""
        from .loading import load

        return load(folder, device=device, dtype=dtype, fast=fast, kind="reranker", instruction=instruction,
                    max_length=max_length, **load_kw)

    @property
    def num_labels(self) -> int:
        return 1                                       # one score per pair: the yes-vs-no logit

    @property
    def max_length(self) -> int:
        return self.max_seq_length

    @property
    def rows(self) -> torch.Tensor:
        """The LM head's "no" and "yes" rows [2, H], fp32."""
        return self.head.rows

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(num_labels=1, instruction=self.default_instruction or DEFAULT_INSTRUCTION)
        return d

    def pair_ids(self, pairs, truncate: bool = True, instruction: str | None = None) -> list[PairSeq]:
        """Pairs -> prefix + "<Instruct>: ...<Query>: ...<Document>: ..." + suffix ids, the body cut to fit
        max_length (truncate=False: ValueError naming the first over-long pair). instruction None: the
        model's default (load(instruction=...)), else the model card's."""
        pairs, _ = check_pairs(list(pairs))
        if instruction is None:
            instruction = self.default_instruction
        elif not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        tok = self._require_tokenizer()
        texts = [format_pair(q, d, instruction) for q, d in pairs]
        room = self.max_seq_length - len(self.prefix) - len(self.suffix)
        try:
            bodies = tok.encode(texts, room, truncate)
        except ValueError:
            raw = tok.encode_raw(texts)
            i = next(i for i, s in enumerate(raw) if len(s) > room)
            raise ValueError(f"pairs[{i}] has {len(raw[i]) + len(self.prefix) + len(self.suffix)} tokens with the "
                             f"reranker's prompt, more than the model's maximum of {self.max_seq_length}; pass "
                             "truncate=True to cut it") from None
        return [PairSeq(self.prefix + ids + self.suffix, None) for ids in bodies]


__all__ = ["DecoderReranker", "DecoderRerankerParts", "YesNoHead", "format_pair", "is_decoder_reranker_folder",
           "load_decoder_reranker_parts", "PREFIX", "SUFFIX", "DEFAULT_INSTRUCTION"]
