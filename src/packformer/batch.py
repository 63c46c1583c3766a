"""The packed batch: all tokens of all sequences concatenated, `cu_seqlens` marking the boundaries.

This is the one boundary of the engine. Padding exists only at the edges: `unpad_input` turns a
padded [B, L, ...] tensor into packed rows once on entry, `pad_input` scatters them back once on exit
(the pattern of flash-attention's `bert_padding`).
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor                 # [T] int64
    positions: torch.Tensor                 # [T] int64, already offset (RoBERTa: pad_id + 1 + i)
    cu_seqlens: torch.Tensor                # [B+1] int32, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    max_seqlen: int
    token_type_ids: torch.Tensor | None = None  # [T] int64
    order: torch.Tensor | None = None       # [B] int64: index of each sequence in the caller's input

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seqlens(self) -> torch.Tensor:      # [B] int32
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, input_ids=mv(self.input_ids), positions=mv(self.positions),
                       cu_seqlens=mv(self.cu_seqlens), token_type_ids=mv(self.token_type_ids),
                       order=self.order)

    def select(self, seq_indices: Sequence[int]) -> "PackedBatch":
        """A new packed batch holding only the given sequences, in the given order."""
        lens = self.seqlens.tolist()
        starts = self.cu_seqlens[:-1].tolist()
        parts = [torch.arange(starts[i], starts[i] + lens[i]) for i in seq_indices]
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        idx = idx.to(self.device)
        new_lens = [lens[i] for i in seq_indices]
        order = None if self.order is None else self.order[list(seq_indices)]
        return PackedBatch(
            input_ids=self.input_ids[idx], positions=self.positions[idx],
            cu_seqlens=cu_seqlens_from_lengths(new_lens).to(self.device),
            max_seqlen=max(new_lens, default=0),
            token_type_ids=None if self.token_type_ids is None else self.token_type_ids[idx],
            order=order)


def cu_seqlens_from_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """[B] lengths -> [B+1] int32 prefix sums starting at 0."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    if len(lengths):
        np.cumsum(np.asarray(lengths, dtype=np.int64), out=cu[1:], dtype=np.int32)
    return torch.from_numpy(cu)


def positions_for(lengths: Sequence[int] | np.ndarray, offset: int = 0) -> torch.Tensor:
    """[T] position ids, restarting at `offset` for each sequence."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return torch.from_numpy(np.arange(total, dtype=np.int64) - starts + offset)


def roberta_positions(flat: np.ndarray, lengths: Sequence[int], position_offset: int) -> torch.Tensor | None:
    """RoBERTa-style position ids (position_offset = pad id + 1: RoBERTa, XLM-R, CamemBERT, MPNet) where a
    sequence holds the pad id itself (a literal "<pad>" in a text): that token gets the pad position and
    the tokens after it do not count it, as transformers' create_position_ids_from_input_ids (and
    fairseq's make_positions) number them. None when no pad id occurs: plain positions_for then."""
    pad = position_offset - 1
    is_pad = flat == pad                                                    # [T]
    if not is_pad.any():
        return None
    lengths = np.asarray(lengths, dtype=np.int64)
    real = (~is_pad).astype(np.int64)
    count = np.cumsum(real)                                                 # real tokens so far, whole batch
    before = np.repeat(np.concatenate(([0], count))[np.cumsum(lengths) - lengths], lengths)
    return torch.from_numpy((count - before) * real + pad)


def pack(sequences: Sequence[Sequence[int]], position_offset: int = 0,
         token_types: Sequence[Sequence[int]] | None = None,
         order: Sequence[int] | None = None) -> PackedBatch:
    """Pack lists of token ids (special tokens already added) into a PackedBatch. With a position offset
    (RoBERTa-style), a pad id inside a sequence is numbered as transformers numbers it (roberta_positions)."""
    lengths = [len(s) for s in sequences]
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=sum(lengths))
    positions = roberta_positions(flat, lengths, position_offset) if position_offset > 0 else None
    tt = None
    if token_types is not None:
        tt = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(token_types), dtype=np.int64,
                                          count=sum(lengths)))
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        positions=positions if positions is not None else positions_for(lengths, position_offset),
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        max_seqlen=max(lengths, default=0),
        token_type_ids=tt,
        order=None if order is None else torch.as_tensor(list(order), dtype=torch.long),
    )


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Padded [B, L, ...] + mask [B, L] (True/1 = real token) -> packed [T, ...], indices [T],
    cu_seqlens [B+1] int32, max_seqlen. Real tokens need not be left-aligned."""
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)                   # [B]
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # [T]
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(seqlens, dim=0)
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return flat[indices], indices, cu, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Packed [T, ...] -> padded [B, L, ...]; positions not in `indices` are zeros."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out[indices] = packed
    return out.view(batch, seqlen, *packed.shape[1:])


def pack_padded_ids(token_ids: torch.Tensor, pad_id: int, position_offset: int = 0,
                    token_type_ids: torch.Tensor | None = None
                    ) -> tuple[PackedBatch, torch.Tensor]:
    """A padded [B, L] id tensor (the tutorial's `to_tensor(..., padding_value=1)`) -> PackedBatch,
    plus the flat indices of its real tokens for `pad_input`. Padding must be on the right."""
    if token_ids.dim() != 2:
        raise ValueError(f"expected padded token ids of shape [B, L], got shape {tuple(token_ids.shape)}")
    mask = token_ids != pad_id
    lengths = mask.sum(dim=1)
    # right padding: every real token sits before the first pad of its row
    expected = torch.arange(token_ids.shape[1], device=token_ids.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected):
        raise ValueError(f"padded token ids must be right-padded with pad id {pad_id}; "
                         "found a pad id before a real token")
    ids, indices, cu, max_seqlen = unpad_input(token_ids.unsqueeze(-1), mask)
    tt = None
    if token_type_ids is not None:
        tt = token_type_ids.reshape(-1)[indices]
    lens = lengths.tolist()
    batch = PackedBatch(input_ids=ids.squeeze(-1), positions=positions_for(lens, position_offset).to(token_ids.device),
                        cu_seqlens=cu, max_seqlen=max_seqlen, token_type_ids=tt)
    return batch, indices
