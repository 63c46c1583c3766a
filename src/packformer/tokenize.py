"""Text -> token ids -> PackedBatch, never a padded [B, L] tensor.

Two tokenizer families: Hugging Face `tokenizers` (tokenizer.json, or vocab.txt for old BERT folders)
and sentencepiece with the fairseq/torchtext id convention (XLM-R).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .batch import PackedBatch, pack
from .files import ModelFileError


def check_text(t, where: str) -> str:
    """t itself if the tokenizers can take it: a str that UTF-8 can encode. A lone surrogate (a JSON
    body may carry "\\ud800") cannot be, and the tokenizer's own error names neither the text nor the
    character. ASCII strings are answered from a flag, so the check costs nothing on them."""
    if not isinstance(t, str):
        raise TypeError(f"{where} is {type(t).__name__}, expected str")
    if not t.isascii():
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where} holds {t[e.start]!r} at position {e.start}: a lone surrogate, not a "
                             "character (from bytes that are not UTF-8, or an unpaired \\ud800-\\udfff escape in "
                             "JSON)") from None
    return t


def check_texts(texts) -> list[str]:
    """A str or a list of str -> list[str]; anything else raises TypeError (ValueError for a str with a
    lone surrogate) naming the bad item's index."""
    if isinstance(texts, str):
        return [check_text(texts, "the text")]
    if isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        check_text(t, f"texts[{i}]")
    return texts


def longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Lengths (a, b) a pair of n1 + n2 tokens is cut to so that a + b <= budget, the way the Rust
    tokenizers' `longest_first` strategy cuts them (what transformers' fast tokenizers and
    sentence-transformers' CrossEncoder run): the longer side loses tokens first; when both must be cut,
    each keeps half of the budget and the longer side (the second on a tie) the odd token."""
    if n1 + n2 <= budget:
        return n1, n2
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    a, b = n1, (n1 if n1 > budget else max(n1, budget - n1))
    if a + b > budget:
        a = budget // 2
        b = a + budget % 2
    if swap:
        a, b = b, a
        n1, n2 = n2, n1
    return min(a, n1), min(b, n2)


class Tokenizer:
    """Base: subclasses turn texts into id lists with special tokens, truncated to `max_length`."""

    pad_id: int = 0
    position_offset: int = 0
    num_special: int = 2          # tokens added around one sequence ([CLS] ... [SEP], <s> ... </s>)

    def encode_raw(self, texts: list[str]) -> list[list[int]]:   # with special tokens, untruncated
        raise NotImplementedError

    def encode(self, texts: Sequence[str], max_length: int, truncate: bool = True) -> list[list[int]]:
        """Ids with special tokens. Over-long texts are cut to `max_length` (specials kept) or, with
        truncate=False, raise ValueError naming the first over-long text's index and length."""
        ids = self.encode_raw(check_texts(texts))
        for i, seq in enumerate(ids):
            if len(seq) > max_length:
                if not truncate:
                    raise ValueError(f"texts[{i}] has {len(seq)} tokens, more than the model's maximum of "
                                     f"{max_length}; pass truncate=True to cut it")
                ids[i] = self._truncate(seq, max_length)
        return ids

    def _truncate(self, seq: list[int], n: int) -> list[int]:
        trailing = getattr(self, "num_trailing_special", None)
        if trailing is not None and self.num_special == 1:   # one special token, at the end (Qwen3's EOS): kept
            return seq[: n - trailing] + seq[len(seq) - trailing:] if trailing else seq[:n]
        if self.num_special >= 2:             # keep the leading and the trailing special token
            return seq[: n - 1] + seq[-1:]
        return seq[:n]

    def pack(self, texts: Sequence[str], max_length: int, truncate: bool = True) -> PackedBatch:
        return pack(self.encode(texts, max_length, truncate), position_offset=self.position_offset)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int, truncate: bool = True
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """Text pairs (a, b) -> (ids, token type ids) with the tokenizer's pair template; pairs over
        `max_length` are cut `longest_first`, or with truncate=False raise ValueError naming the pair."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode text pairs")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (the Rust fast tokenizer, batch-parallel)."""

    def __init__(self, tok, pad_id: int, position_offset: int = 0):
        tok.no_padding()
        tok.no_truncation()      # we truncate ourselves so that truncate=False can report the true length
        self.tok = tok
        self.pad_id = pad_id
        self.position_offset = position_offset
        self.num_special = tok.num_special_tokens_to_add(False)
        # special tokens after the text (Qwen3-Embedding's appended EOS, [SEP]): truncation keeps them, as
        # the tokenizer's own truncation does
        mask = tok.encode("a").special_tokens_mask
        self.num_trailing_special = next((i for i, m in enumerate(reversed(mask)) if not m), len(mask))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, pad_id: int, position_offset: int = 0,
                    lowercase: bool = True) -> "HFTokenizer":
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            try:
                rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001  (the Rust side raises a bare Exception naming no file)
                raise ModelFileError(f"{folder / 'tokenizer.json'} is not a readable tokenizer: {e}") from None
            return cls(rust, pad_id, position_offset)
        if (folder / "vocab.txt").exists():
            from tokenizers import BertWordPieceTokenizer

            wp = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase)
            return cls(wp._tokenizer, pad_id, position_offset)
        raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.txt")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_raw(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.tok.encode_batch_fast(texts)] if hasattr(self.tok, "encode_batch_fast") \
            else [e.ids for e in self.tok.encode_batch(texts)]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int, truncate: bool = True
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """The tokenizer's own pair template (BERT: [CLS] a [SEP] b [SEP], types 0/1; XLM-R:
        <s> a </s></s> b </s>). Pairs that fit are encoded once, untruncated; only the over-long ones are
        encoded again by a copy of the tokenizer with `longest_first` truncation, as transformers does."""
        if not pairs:
            return [], []
        pairs = [tuple(p) for p in pairs]
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        encs = encode(pairs)
        over = [i for i, e in enumerate(encs) if len(e.ids) > max_length]
        if over and not truncate:
            i = over[0]
            raise ValueError(f"pairs[{i}] has {len(encs[i].ids)} tokens, more than the model's maximum of "
                             f"{max_length}; pass truncate=True to cut it")
        if over:
            tt = self._truncating(max_length)
            cut = getattr(tt, "encode_batch_fast", tt.encode_batch)
            for i, e in zip(over, cut([pairs[i] for i in over])):
                encs[i] = e
        return [e.ids for e in encs], [e.type_ids for e in encs]

    def _truncating(self, max_length: int):
        """A copy of the Rust tokenizer that truncates pairs `longest_first` to max_length (kept per length)."""
        cache = self.__dict__.setdefault("_truncating_copies", {})
        tok = cache.get(max_length)
        if tok is None:
            from tokenizers import Tokenizer as RustTokenizer

            tok = RustTokenizer.from_str(self.tok.to_str())
            tok.enable_truncation(max_length, strategy="longest_first")
            cache[max_length] = tok
        return tok


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece with the fairseq dictionary convention used by XLM-R (torchtext and transformers).

    fairseq puts <s>=0, <pad>=1, </s>=2, <unk>=3 first, then the sentencepiece pieces shifted by one:
    fairseq id = spm id + 1, and spm's own <unk> (id 0) maps to 3. Each text becomes <s> ... </s>.
    """

    BOS, PAD, EOS, UNK = 0, 1, 2, 3
    pad_id = PAD
    position_offset = PAD + 1

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        if not Path(model_file).exists():
            raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.num_special = 2

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + 1   # + the fairseq offset (<mask> is added by the checkpoint)

    def encode_raw(self, texts: list[str]) -> list[list[int]]:
        out = []
        unk = self.sp.unk_id()
        for pieces in self.sp.encode(texts, out_type=int):
            a = np.asarray(pieces, dtype=np.int64) + 1
            a[np.asarray(pieces) == unk] = self.UNK
            out.append([self.BOS, *a.tolist(), self.EOS])
        return out

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int, truncate: bool = True
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """XLM-R's pair template <s> a </s></s> b </s> (token types all 0), cut `longest_first`."""
        if not pairs:
            return [], []
        firsts = self.encode_raw([p[0] for p in pairs])
        seconds = self.encode_raw([p[1] for p in pairs])
        ids, types = [], []
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            a, b = a[1:-1], b[1:-1]                       # without their own <s> ... </s>
            n = len(a) + len(b) + 4
            if n > max_length:
                if not truncate:
                    raise ValueError(f"pairs[{i}] has {n} tokens, more than the model's maximum of "
                                     f"{max_length}; pass truncate=True to cut it")
                na, nb = longest_first(len(a), len(b), max_length - 4)
                a, b = a[:na], b[:nb]
            seq = [self.BOS, *a, self.EOS, self.EOS, *b, self.EOS]
            ids.append(seq)
            types.append([0] * len(seq))
        return ids, types
