"""The standard workloads, built exactly (same generator, same seeds), and the tutorial's inputs, so
that figures are comparable across runs and machines.

A workload is either token ids (the standard batches: every peer sees the same ids, padded or
packed) or texts (end to end: tokenization is part of what is timed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batch import PackedBatch, pack
from ..config import EncoderConfig

# The inputs of PyTorch's Better Transformer tutorial, verbatim.
TUTORIAL_SMALL_BATCH = [
    "Hello world",
    "How are you!",
]
TUTORIAL_LONG_PARAGRAPH = """`Well, Prince, so Genoa and Lucca are now just family estates of the
Buonapartes. But I warn you, if you don't tell me that this means war,
if you still try to defend the infamies and horrors perpetrated by
that Antichrist- I really believe he is Antichrist- I will have
nothing more to do with you and you are no longer my friend, no longer
my 'faithful slave,' as you call yourself! But how do you do? I see
I have frightened you- sit down and tell me all the news.`

It was in July, 1805, and the speaker was the well-known Anna
Pavlovna Scherer, maid of honor and favorite of the Empress Marya
Fedorovna. With these words she greeted Prince Vasili Kuragin, a man
of high rank and importance, who was the first to arrive at her
reception. Anna Pavlovna had had a cough for some days. She was, as
she said, suffering from la grippe; grippe being then a new word in
St. Petersburg, used only by the elite."""
TUTORIAL_BIG_BATCH = [*TUTORIAL_SMALL_BATCH, TUTORIAL_LONG_PARAGRAPH]

ID_WORKLOADS = ("tutorial_small", "tutorial_big", "serve_b32", "offline_b256", "offline_b128", "query_b32",
                "query_b1")
# End-to-end text workloads: `generate_texts(N)`.
TEXT_WORKLOADS = {"texts_1500": 1500, "texts_20000": 20000}
ID_SEED = 1          # seed of the random token ids (the lengths have their own, seed 0)


def lengths(name: str) -> list[int]:
    """Token lengths per sequence (special tokens included); fixed by seed 0, so every run sees the same."""
    g = np.random.default_rng(0)
    if name == "tutorial_small":   # the tutorial's small batch
        return [4, 6]
    if name == "tutorial_big":     # the tutorial's big batch: two short + the long paragraph
        return [4, 6, 215]
    if name == "serve_b32":        # an online-serving batch, ~64% padding when padded
        return [int(min(512, max(8, round(math.exp(g.normal(math.log(64), 0.8)))))) for _ in range(32)]
    if name == "offline_b256":     # an offline/bulk batch, ~73% padding when padded (GPU)
        return [int(min(512, max(8, round(math.exp(g.normal(math.log(96), 0.9)))))) for _ in range(256)]
    if name == "offline_b128":     # the CPU bulk batch, ~72% padding when padded
        return [int(min(256, max(8, round(math.exp(g.normal(math.log(48), 0.9)))))) for _ in range(128)]
    if name == "query_b32":        # a batch of search queries: every sequence within one 64-row query block
        return [int(min(64, max(4, round(math.exp(g.normal(math.log(16), 0.6)))))) for _ in range(32)]
    if name == "query_b1":         # one search query (query_b32's median length): a search request's latency
        return [16]
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(ID_WORKLOADS + tuple(TEXT_WORKLOADS))}")


def generate_texts(n: int, seed: int = 7) -> list[str]:
    """The end-to-end texts (offline workloads and bench-serve alike): lognormal lengths of 2 to 220
    words, median ~24, from a small fixed vocabulary. Seed 7 gives the standard text workloads."""
    g = np.random.default_rng(seed)
    vocab = ("river model token batch packed padding engine layer vector query answer city market music "
             "garden winter history science paper review quickly slowly under over between").split()
    return [" ".join(g.choice(vocab, size=int(min(220, max(2, math.exp(g.normal(math.log(24), 0.9)))))))
            for _ in range(n)]


def random_ids(lens: list[int], cfg: EncoderConfig, seed: int = ID_SEED) -> list[list[int]]:
    """Random non-special ids of the given lengths; never the padding id."""
    lo, hi = cfg.regular_id_range()
    g = np.random.default_rng(seed)
    return [g.integers(lo, hi, size=n).tolist() for n in lens]


def pad_ids(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] int64 ids (the tutorial's `to_tensor(..., padding_value=pad_id)`) and the
    [B, L] int64 attention mask (1 = real token)."""
    width = max((len(s) for s in ids), default=0)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, s in enumerate(ids):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return out, mask


@dataclass
class Workload:
    """One batch to benchmark: token ids (standard batches) or texts (end to end)."""

    name: str
    ids: list[list[int]] | None = None
    texts: list[str] | None = None
    lengths: list[int] = field(default_factory=list)    # tokens per sequence (text workloads: after tokenizing)

    @property
    def is_text(self) -> bool:
        return self.texts is not None

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def real_tokens(self) -> int:
        return int(sum(self.lengths))

    def padded_tokens(self, batch_size: int | None = None) -> int:
        """Tokens a padded peer processes: B x L for one batch; per chunk of `batch_size` in input order
        for text workloads (a DataLoader over the texts)."""
        if not self.lengths:
            return 0
        step = batch_size or len(self.lengths)
        return sum(len(self.lengths[i:i + step]) * max(self.lengths[i:i + step])
                   for i in range(0, len(self.lengths), step))

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ids is None:
            raise ValueError(f"workload {self.name} holds texts, not token ids")
        return pad_ids(self.ids, pad_id)

    def packed(self, position_offset: int) -> PackedBatch:
        if self.ids is None:
            raise ValueError(f"workload {self.name} holds texts, not token ids")
        return pack(self.ids, position_offset, order=range(len(self.ids)))

    def describe(self, batch_size: int | None = None) -> dict:
        padded = self.padded_tokens(batch_size)
        return {"name": self.name, "kind": "texts" if self.is_text else "token_ids", "num_seqs": self.num_seqs,
                "real_tokens": self.real_tokens, "padded_tokens": padded,
                "pad_fraction": round(1 - self.real_tokens / padded, 4) if padded else 0.0,
                "max_len": max(self.lengths, default=0), "lengths": list(self.lengths)}


def build_workload(name: str, cfg: EncoderConfig, max_len: int | None = None, tokenizer=None,
                   texts: list[str] | None = None) -> Workload:
    """A standard id batch by name, a text workload by name (texts_1500 ...), or `texts` given by the
    user (name is then a label). Text workloads need `tokenizer` (a packformer Tokenizer) to count tokens."""
    limit = max_len or cfg.max_tokens_per_sequence
    if texts is not None or name in TEXT_WORKLOADS:
        if texts is None:
            texts = generate_texts(TEXT_WORKLOADS[name])
        if tokenizer is None:
            raise ValueError(f"workload {name} is made of texts and the model has no tokenizer; use a standard "
                             f"token-id batch ({', '.join(ID_WORKLOADS)}) or a model folder with a tokenizer")
        lens = [min(len(s), limit) for s in tokenizer.encode_raw(list(texts))]
        return Workload(name=name, texts=list(texts), lengths=lens)
    lens = lengths(name)
    if max(lens) > limit:
        raise ValueError(f"workload {name} has a sequence of {max(lens)} tokens; the model takes at most {limit}")
    return Workload(name=name, ids=random_ids(lens, cfg), lengths=lens)


def read_texts_file(path: str | Path) -> list[str]:
    """One text per line; blank lines are skipped."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"texts file not found: {p}")
    texts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"texts file {p} has no non-empty lines")
    return texts
