"""Decoder rerankers (Qwen3-Reranker): score = P("yes") of the next token after a judging prompt.

The model card's recipe, on packed rows: each (query, document) becomes
    prefix + tokens("<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}") + suffix
with the body cut to `max_length - len(prefix) - len(suffix)` tokens; the Qwen3 body runs causally (families/
qwen3.py), the last token's final hidden state meets only the two LM-head rows of "no" and "yes" (never the
whole vocabulary: 151k rows), and the score is softmax([no, yes])[1]. The rows come from `lm_head.weight`
(read alone from model.safetensors, two rows) or, with tied embeddings, from the word embeddings already
loaded (shared, not copied).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .engine import Model
from .heads import last_tokens
from .runtime import plan_chunks

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_pair(query: str, document: str, instruction: str | None = None) -> str:
    """The text between the prefix and the suffix, as the model card writes it."""
    return (f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}")


def _lm_head_rows(folder: Path, ids: list[int]) -> torch.Tensor | None:
    """Rows `ids` of lm_head.weight from the folder's safetensors, read alone; None where there is none
    (tied embeddings)."""
    from safetensors import safe_open

    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
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


class DecoderReranker:
    """predict(pairs) -> scores in [0, 1]; rank(query, documents) -> [{"corpus_id", "score"}] best first."""

    def __init__(self, model: Model, yes_no: torch.Tensor, prefix: list[int], suffix: list[int],
                 max_length: int = 8192, instruction: str | None = None):
        if model.config.family != "qwen3":
            raise ValueError(f"a decoder reranker needs a Qwen3 model, got the {model.config.family} family")
        self.model, self.prefix, self.suffix = model, prefix, suffix
        self.rows = yes_no.to(model.device, torch.float32)                                 # [2, H]: no, yes
        self.max_length = min(max_length, model.config.max_tokens_per_sequence)
        self.instruction = instruction
        if self.max_length <= len(prefix) + len(suffix):
            raise ValueError(f"max_length {max_length} leaves no room between the prompt's {len(prefix)} prefix "
                             f"and {len(suffix)} suffix tokens")

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | None = "cpu", dtype: str | torch.dtype | None = None,
                    fast: bool | None = None, max_length: int = 8192, instruction: str | None = None,
                    **load_kw) -> "DecoderReranker":
        """A Qwen3ForCausalLM folder (Qwen3-Reranker) with its tokenizer.json."""
        from .loading import load

        folder = Path(folder)
        model = load(folder, device=device, dtype=dtype, fast=fast, **load_kw)
        tok = model._require_tokenizer().tok
        ids = [tok.token_to_id(t) for t in ("no", "yes")]
        if None in ids:
            raise ValueError(f"{folder}: the tokenizer has no single 'yes' / 'no' token, so it is not a yes/no reranker")
        rows = _lm_head_rows(folder, ids)
        if rows is None:                                   # tied: the word embeddings are the LM head
            rows = model.encoder.embeddings.word.weight[ids].detach()
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids                    # noqa: E731
        return cls(model, rows, enc(PREFIX), enc(SUFFIX), max_length, instruction)

    def token_ids(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[list[int]]:
        if isinstance(pairs, tuple) or not all(isinstance(p, (tuple, list)) and len(p) == 2 and
                                               all(isinstance(x, str) for x in p) for p in pairs):
            raise TypeError("pairs must be a list of (query, document) string pairs")
        texts = [format_pair(q, d, instruction or self.instruction) for q, d in pairs]
        body = self.max_length - len(self.prefix) - len(self.suffix)
        return [self.prefix + ids + self.suffix for ids in self.model._require_tokenizer().encode(texts, body)]

    @torch.inference_mode()
    def scores_of_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """Packed id lists -> P(yes) [B] fp32: the last token's hidden state against the two rows only."""
        batch = self.model.pack_ids(ids)
        h = self.model.hidden_states(batch)                                                 # [T, H]
        last = last_tokens(h.float(), batch.cu_seqlens.to(h.device))                        # [B, H]
        return torch.softmax(last @ self.rows.t(), dim=-1)[:, 1]                            # [B]

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None,
                instruction: str | None = None) -> np.ndarray:
        """Scores [N] (P("yes")) in input order."""
        ids = self.token_ids(list(pairs), instruction)
        out = np.zeros(len(ids), dtype=np.float32)
        for chunk in plan_chunks([len(x) for x in ids], self.model.max_batch_tokens, batch_size):
            out[chunk] = self.scores_of_ids([ids[i] for i in chunk]).cpu().numpy()
        return out

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, instruction: str | None = None) -> list[dict]:
        """[{"corpus_id", "score"(, "text")}] sorted by score, best first (CrossEncoder.rank's shape)."""
        scores = self.predict([(query, d) for d in documents], batch_size, instruction)
        order = np.argsort(-scores, kind="stable")[: top_k]
        return [{"corpus_id": int(i), "score": float(scores[i]), **({"text": documents[i]} if return_documents else {})}
                for i in order]


__all__ = ["DecoderReranker", "format_pair", "PREFIX", "SUFFIX", "DEFAULT_INSTRUCTION"]
