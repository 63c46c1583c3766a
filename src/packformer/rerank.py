"""Cross-encoders (rerankers): a (query, document) pair in, a relevance score out.

A pair is tokenized with the folder's own pair template straight into one packed segment
(`[CLS] q [SEP] d [SEP]` with token types 0/1 for BERT, `<s> q </s></s> d </s>` for XLM-R), cut
`longest_first` to the model's maximum length as transformers does; the encoder and the
*ForSequenceClassification head run on the packed batch, and the folder's activation (Sigmoid for one
label unless it says otherwise) turns logits into scores. `predict` and `rank` follow
sentence-transformers' `CrossEncoder` (arguments, defaults, results).

Folders recognised as cross-encoders (`is_cross_encoder_folder`):
- sentence-transformers >= 6 (`CrossEncoder.save_pretrained`): config_sentence_transformers.json with
  "model_type": "CrossEncoder" (and "activation_fn"), modules.json holding one Transformer module;
- sentence-transformers 4/5: config.json's "sentence_transformers": {"activation_fn": ...};
- sentence-transformers < 4: config.json's "sbert_ce_default_activation_function";
- a Hugging Face *ForSequenceClassification folder with one label.
"""
from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .batch import PackedBatch, pack
from .engine import Model
from .files import read_json
from .loaders.parts import ModelParts
from .runtime import plan_chunks
from .tokenize import check_text

log = logging.getLogger(__name__)

SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"
ST_CONFIG = "config_sentence_transformers.json"


# ---- folders ------------------------------------------------------------------------------------
@dataclass
class CrossEncoderParts(ModelParts):
    """ModelParts of a cross-encoder: the activation its folder names (a dotted torch path; None = the
    default: Sigmoid for one label, else Identity)."""

    activation: str | None = None


def _json(path: Path) -> dict:
    try:
        return read_json(path) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _transformer_dir(folder: Path) -> Path:
    """The folder of the one Transformer module that a cross-encoder's modules.json lists (or folder)."""
    mpath = folder / "modules.json"
    if not mpath.exists():
        return folder
    modules = read_json(mpath)
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds != ["Transformer"]:
        raise ValueError(f"{mpath}: packformer runs cross-encoders made of one Transformer module "
                         f"(a *ForSequenceClassification model); found modules {kinds}")
    return folder / modules[0].get("path", "")


def is_cross_encoder_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a cross-encoder (see the module docstring for the formats)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if _json(folder / ST_CONFIG).get("model_type") == "CrossEncoder":
        return True
    if (folder / "modules.json").exists():      # a SentenceTransformer (bi-encoder) folder
        return False
    cfg = _json(folder / "config.json")
    if "activation_fn" in (cfg.get("sentence_transformers") or {}) or cfg.get("sbert_ce_default_activation_function"):
        return True
    archs = cfg.get("architectures") or []
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1


def folder_activation(folder: Path, tdir: Path) -> str | None:
    """The activation the folder names, looked up in sentence-transformers' order; None if none."""
    st = _json(folder / ST_CONFIG)
    if st.get("activation_fn"):
        return st["activation_fn"]
    cfg = _json(tdir / "config.json")
    return ((cfg.get("sentence_transformers") or {}).get("activation_fn")
            or cfg.get("sbert_ce_default_activation_function"))


def folder_max_length(folder: Path, tdir: Path, limit: int) -> int:
    """Tokens per pair, as sentence-transformers reads them: sentence_bert_config.json's max_seq_length,
    else tokenizer_config.json's model_max_length, capped at the model's positions."""
    for path, key in ((folder / "sentence_bert_config.json", "max_seq_length"),
                      (tdir / "sentence_bert_config.json", "max_seq_length"),
                      (tdir / "tokenizer_config.json", "model_max_length")):
        v = _json(path).get(key)
        if isinstance(v, (int, float)) and 0 < v < 1e9:
            return min(int(v), limit)
    return limit


def load_cross_encoder_parts(folder: str | Path) -> CrossEncoderParts:
    """A cross-encoder folder -> CrossEncoderParts (weights on CPU, fp32)."""
    from .loaders.hf import load_hf

    folder = Path(folder)
    tdir = _transformer_dir(folder)
    parts = load_hf(tdir)
    if parts.head is None:
        raise ValueError(f"{tdir} has no *ForSequenceClassification head; a cross-encoder scores pairs with one "
                         f"(config.json architectures: {_json(tdir / 'config.json').get('architectures')})")
    fields = {f: getattr(parts, f) for f in ModelParts.__dataclass_fields__}
    fields.update(max_seq_length=folder_max_length(folder, tdir, parts.config.max_tokens_per_sequence),
                  source=str(folder), format="cross-encoder")
    return CrossEncoderParts(**fields, activation=folder_activation(folder, tdir))


def resolve_activation(path: str | None, num_labels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A dotted torch path (what sentence-transformers saves) -> an instance; untrusted (non-torch) paths
    fall back to the default with a warning, as sentence-transformers does without trust_remote_code."""
    if path:
        if path.startswith("torch."):
            mod, _, name = path.rpartition(".")
            try:
                return getattr(importlib.import_module(mod), name)()
            except (ImportError, AttributeError, TypeError) as e:
                raise ValueError(f"the folder's activation_fn {path!r} cannot be built: {e}") from e
        log.warning("activation function %r is not a torch class; using the default (Sigmoid for one label, "
                    "else Identity), as sentence-transformers does without trust_remote_code", path)
    return nn.Sigmoid() if num_labels == 1 else nn.Identity()


# ---- inputs -------------------------------------------------------------------------------------
def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, str) for t in x)


def check_pairs(pairs: Any) -> tuple[list[tuple[str, str]], bool]:
    """One pair or a list of pairs -> (list of (str, str), whether a single pair was given); TypeError
    naming the bad item otherwise."""
    if _is_pair(pairs):
        return [(check_text(pairs[0], "pair[0]"), check_text(pairs[1], "pair[1]"))], True
    if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"pairs must be a (str, str) pair or a list of them, got {type(pairs).__name__}")
    out = []
    for i, p in enumerate(pairs):
        if not _is_pair(p):
            what = (f"a {type(p).__name__} of {len(p)}" if isinstance(p, (tuple, list)) else type(p).__name__)
            raise TypeError(f"pairs[{i}] must be a (str, str) pair, got {what}")
        out.append((check_text(p[0], f"pairs[{i}][0]"), check_text(p[1], f"pairs[{i}][1]")))
    return out, False


@dataclass(slots=True)
class PairSeq:
    """One tokenized pair: ids with the template's special tokens, and token types (None: the model has
    no token types). len() is its token count (what the server's scheduler budgets)."""

    ids: list[int]
    types: list[int] | None

    def __len__(self) -> int:
        return len(self.ids)


# ---- the model ----------------------------------------------------------------------------------
class CrossEncoderModel(Model):
    """A loaded cross-encoder: `predict(pairs)` and `rank(query, documents)` as sentence-transformers'
    CrossEncoder; `classify(texts)` still gives the head's logits of single texts."""

    kind = "reranker"

    def __init__(self, parts: ModelParts, *args, activation: str | None = None, **kwargs):
        super().__init__(parts, *args, **kwargs)
        if self.head is None:
            raise ValueError(f"model {self.source} has no classification head; a cross-encoder needs one")
        self.activation_name = activation if activation is not None else getattr(parts, "activation", None)
        self.activation_fn = resolve_activation(self.activation_name, self.num_labels)
        # BERT-style models read token types (0 = query, 1 = document); XLM-R / RoBERTa have one type
        self.uses_token_types = self.config.type_vocab_size >= 2

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(kind=self.kind, activation=type(self.activation_fn).__name__)
        return d

    def encode(self, *args, **kwargs):
        raise RuntimeError(f"model {self.source} is a cross-encoder (reranker): it scores (query, document) "
                           "pairs with predict() / rank(), it does not embed texts; load an embedding model "
                           "for encode()")

    # ---- tokenization -------------------------------------------------------------------------
    def pair_ids(self, pairs: Sequence[tuple[str, str]], truncate: bool = True,
                 instruction: str | None = None) -> list[PairSeq]:
        """Pairs -> tokenized PairSeqs with the folder's template, cut `longest_first` to max_seq_length
        (truncate=False: ValueError naming the first over-long pair). `instruction` is for decoder rerankers
        (decoder_rerank.py); an encoder cross-encoder has none."""
        if instruction is not None:
            raise ValueError(f"model {self.source} takes no instruction: it is an encoder cross-encoder; "
                             "instructions are for decoder rerankers (Qwen3-Reranker)")
        pairs, _ = check_pairs(list(pairs))
        tok = self._require_tokenizer()
        try:
            ids, types = tok.encode_pairs(pairs, self.max_seq_length, truncate)
        except NotImplementedError as e:
            raise RuntimeError(f"model {self.source}: {e}; load a folder with tokenizer.json") from e
        if not self.uses_token_types:
            return [PairSeq(s, None) for s in ids]
        bad = next((i for i, t in enumerate(types) if max(t, default=0) >= self.config.type_vocab_size), None)
        if bad is not None:
            raise ValueError(f"pairs[{bad}]: the tokenizer gives token type {max(types[bad])}, but the model has "
                             f"only {self.config.type_vocab_size}")
        return [PairSeq(s, t) for s, t in zip(ids, types)]

    def pack_pairs(self, seqs: Sequence[PairSeq]) -> PackedBatch:
        types = [s.types for s in seqs] if self.uses_token_types else None
        return pack([s.ids for s in seqs], self.config.position_offset, token_types=types)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_seqs(self, seqs: Sequence[PairSeq]) -> torch.Tensor:
        """One packed batch of tokenized pairs -> logits [B, C] fp32 on the model's device (the server's
        worker calls this once per scheduler batch)."""
        return self.classify_batch(self.pack_pairs(seqs))

    def logits(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, truncate: bool = True,
               show_progress_bar: bool | None = None, instruction: str | None = None) -> torch.Tensor:
        """Pairs -> logits [N, C] fp32 on CPU, input order. Batches are packed under the token budget
        (batch_size caps the pairs per batch on top); a pair's logits never depend on its batch.
        instruction: a decoder reranker's (pair_ids)."""
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        seqs = self.pair_ids(pairs, truncate, instruction=instruction)
        out = torch.empty(len(seqs), self.num_labels, dtype=torch.float32)
        plans = plan_chunks([len(s) for s in seqs], self.max_batch_tokens, batch_size)
        bar = None
        if show_progress_bar or (show_progress_bar is None and len(plans) > 20 and _tty()):
            from tqdm.auto import tqdm
            bar = tqdm(total=len(seqs), desc="packformer", unit="pair")
        for plan in plans:
            out[torch.as_tensor(plan)] = self.score_seqs([seqs[i] for i in plan]).float().cpu()
            if bar is not None:
                bar.update(len(plan))
        if bar is not None:
            bar.close()
        return out

    def predict(self, pairs, batch_size: int | None = None, activation_fn: Callable | None = None,
                convert_to_numpy: bool = True, show_progress_bar: bool | None = None,
                apply_softmax: bool = False, convert_to_tensor: bool = False,
                truncate: bool = True, instruction: str | None = None) -> np.ndarray | torch.Tensor | float:
        """Scores of (a, b) pairs in input order, as CrossEncoder.predict: [N] for one label, [N, C] else
        (a single pair gives a scalar / [C]). activation_fn None: the folder's (Sigmoid for one label by
        default); pass nn.Identity() for raw logits. numpy by default, a tensor with
        convert_to_numpy=False or convert_to_tensor=True. instruction: a decoder reranker's (its default if None)."""
        pairs, single = check_pairs(pairs)
        scores = self.logits(pairs, batch_size=batch_size, truncate=truncate, show_progress_bar=show_progress_bar,
                             instruction=instruction)
        fn = self.activation_fn if activation_fn is None else activation_fn
        with torch.inference_mode():
            scores = fn(scores)
            if self.num_labels == 1:
                scores = scores.squeeze(-1)                                   # [N]
            elif apply_softmax:
                scores = torch.softmax(scores, dim=1)
        if single:
            scores = scores[0]
        if convert_to_tensor or not convert_to_numpy:
            return scores
        return scores.numpy()

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, activation_fn: Callable | None = None,
             show_progress_bar: bool | None = None, truncate: bool = True,
             instruction: str | None = None) -> list[dict[str, Any]]:
        """`documents` ranked by their score against `query`, best first, as CrossEncoder.rank:
        [{"corpus_id", "score"(, "text")}], the top_k first (None: all)."""
        if self.num_labels != 1:
            raise ValueError(f"rank() needs a model with one label; {self.source} has {self.num_labels}: "
                             "use predict() with pairs instead")
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        check_text(query, "query")
        if isinstance(documents, str) or not hasattr(documents, "__iter__"):
            raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
        documents = list(documents)
        for i, d in enumerate(documents):
            check_text(d, f"documents[{i}]")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if not documents:
            return []
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size, activation_fn=activation_fn,
                              convert_to_numpy=False, show_progress_bar=show_progress_bar, truncate=truncate,
                              instruction=instruction)
        return ranked(scores.reshape(-1).tolist(), documents if return_documents else None, top_k)


def ranked(scores: Sequence[float], documents: Sequence[str] | None = None, top_k: int | None = None
           ) -> list[dict[str, Any]]:
    """[{"corpus_id", "score"(, "text")}] sorted by score, best first (ties keep input order)."""
    results = [{"corpus_id": i, "score": float(s)} for i, s in enumerate(scores)]
    if documents is not None:
        for r in results:
            r["text"] = documents[r["corpus_id"]]
    results.sort(key=lambda r: r["score"], reverse=True)
    return results[:top_k]


def model_kind(model) -> str:
    """"reranker", "classifier" or "embedding": what a loaded model is for."""
    if isinstance(model, CrossEncoderModel):
        return "reranker"
    return "classifier" if getattr(model, "head", None) is not None else "embedding"


def _tty() -> bool:
    import sys
    return sys.stderr.isatty()
