"""Graph buckets and the padded cu_seqlens layout (pure host logic; the replays are tested in test_cuda.py)."""
import numpy as np
import pytest

from packformer.fast.graphs import DUMMY_CHUNK, padded_cu_seqlens, seq_bucket, token_buckets


def test_buckets_are_64_apart_then_at_most_12_5_percent_apart_and_cover_the_maximum():
    b = token_buckets(8192)
    assert b[:8] == [64, 128, 192, 256, 320, 384, 448, 512]
    assert b[-1] >= 8192 and all(x % 64 == 0 for x in b) and b == sorted(set(b))
    assert max(hi / lo for lo, hi in zip(b[7:], b[8:])) <= 1.125


def test_seq_buckets_are_powers_of_two_of_at_least_four():
    assert [seq_bucket(n) for n in (0, 1, 4, 5, 32, 33)] == [4, 4, 4, 8, 32, 64]


def test_padded_cu_seqlens_puts_real_then_dummy_pieces_then_empty_segments():
    cu = padded_cu_seqlens([3, 5], 300, 8)
    assert cu.dtype == np.int32 and cu.tolist() == [0, 3, 8, 8 + DUMMY_CHUNK, 8 + 2 * DUMMY_CHUNK, 300, 300, 300, 300]


def _layout_problems(cu, seqlens, n_tokens, n_slots, chunk=DUMMY_CHUNK):
    """What makes `cu` a wrong graph layout for these sequences: [] when it is right. Right means
    n_slots + 1 entries: the real sequences first, in order; then [T, n_tokens) in as few pieces as
    pieces of at most `chunk` tokens allow (the slot count of a graph is sized for exactly that); then
    empty segments only."""
    cu, b, t = [int(c) for c in cu], len(seqlens), sum(seqlens)
    pieces = np.diff(cu).tolist()
    dummy = [p for p in pieces[b:] if p]
    problems = []
    if len(cu) != n_slots + 1:
        problems.append(f"{len(cu)} entries for {n_slots} slots")
    if cu[:b + 1] != np.cumsum([0, *seqlens]).tolist():
        problems.append("the real sequences do not come first, in order")
    if cu[-1] != n_tokens or any(p < 0 for p in pieces):
        problems.append("the segments do not end at n_tokens in increasing order")
    if pieces[b:b + len(dummy)] != dummy:
        problems.append("an empty segment before a dummy piece")
    if any(p > chunk for p in dummy):
        problems.append(f"a dummy piece longer than {chunk}")
    if len(dummy) != -(-(n_tokens - t) // chunk):
        problems.append(f"{len(dummy)} dummy pieces for {n_tokens - t} padding tokens")
    return problems


@pytest.mark.parametrize("seqlens, n_tokens, n_slots, chunk", [
    ([3, 5], 300, 8, DUMMY_CHUNK),        # 292 padding tokens: 128 + 128 + 36
    ([10], 138, 3, DUMMY_CHUNK),          # exactly one full piece
    ([10], 139, 3, DUMMY_CHUNK),          # one token over: a second piece of 1, every slot used
    ([64], 64, 4, DUMMY_CHUNK),           # no padding
    ([1] * 5, 200, 9, 50),                # another chunk size: 195 = 50 + 50 + 50 + 45
])
def test_padded_cu_seqlens_layout(seqlens, n_tokens, n_slots, chunk):
    cu = padded_cu_seqlens(seqlens, n_tokens, n_slots, chunk)
    assert cu.dtype == np.int32
    assert _layout_problems(cu, seqlens, n_tokens, n_slots, chunk) == []


@pytest.mark.parametrize("cu, problem", [
    ([0, 3, 8, 300, 300, 300, 300, 300, 300], "longer than 128"),                  # all padding in one piece
    ([0, 3, 8, 72, 136, 200, 264, 300, 300], "5 dummy pieces"),                     # more pieces than needed
    ([0, 3, 8, 136, 136, 264, 300, 300, 300], "empty segment before a dummy"),
    ([0, 128, 256, 292, 295, 300, 300, 300, 300], "real sequences"),               # padding first
    ([0, 3, 8, 136, 264, 300, 300, 300], "entries"),
])
def test_the_layout_check_catches_wrong_layouts(cu, problem):
    found = _layout_problems(cu, [3, 5], 300, 8)
    assert any(problem in p for p in found), found


def test_padded_cu_seqlens_exact_fit_has_no_dummy():
    assert padded_cu_seqlens([64], 64, 4).tolist() == [0, 64, 64, 64, 64]


def test_padded_cu_seqlens_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        padded_cu_seqlens([100], 64, 4)
    with pytest.raises(ValueError, match="do not fit"):
        padded_cu_seqlens([1] * 5, 64, 4)
    with pytest.raises(ValueError, match="do not fit"):
        padded_cu_seqlens([10], 139, 2)       # 129 padding tokens need two pieces, and so three slots


@pytest.mark.parametrize("rows", [2, 3])
def test_one_input_buffer_holds_ids_positions_types_and_cu_seqlens_side_by_side(rows):
    import torch
    from packformer.fast.graphs import _Captured
    n, slots = 64, 5
    size = _Captured.size(n, rows, slots)
    cap = _Captured(graph=None, n=n, slots=slots, rows=rows, inputs=torch.zeros(size, dtype=torch.long))
    host = np.zeros(size, dtype=np.int64)
    ids, pos, tt, cu = cap.split(host, np.int32)
    assert (tt is None) == (rows == 2) and cu.dtype == np.int32 and cu.shape == (slots + 1,)
    views = [v for v in (ids, pos, tt, cu) if v is not None]
    for i, v in enumerate(views):          # every view writes its own bytes of the one buffer
        v[...] = i + 1
    assert set(np.unique(host.view(np.int32))) - {0} == set(range(1, len(views) + 1))
    cap.inputs.copy_(torch.from_numpy(host))               # the device-side split sees the same layout
    t_ids, t_pos, t_tt, t_cu = cap.split(cap.inputs, torch.int32)
    assert (t_ids == 1).all() and (t_pos == 2).all() and (t_tt is None or (t_tt == 3).all())
    assert t_cu.dtype == torch.int32 and torch.equal(t_cu, torch.from_numpy(cu.copy()))


def test_a_batch_with_visible_key_prefixes_runs_eagerly_never_from_a_graph():
    """Captured graphs attend to every key: a batch whose meta limits the keys (ColBERT query expansion)
    goes to the eager forward, however often its shape repeats."""
    import torch

    from packformer.batch import pack
    from packformer.fast.graphs import GraphRunner
    from packformer.ops.attention import AttentionMeta

    calls = []

    class Forward:
        device, dtype = torch.device("cpu"), torch.float32

        def __call__(self, batch, meta, out=None):
            calls.append(meta.key_lens)
            return torch.zeros(batch.num_tokens, 4)

    runner = GraphRunner(Forward(), max_tokens=256, max_seqlen=64, hidden=4, capture_after=1)
    batch = pack([[5, 6, 7, 8], [5, 6, 7]], 0)
    meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, [4, 3], key_lens=[2, 3])
    for _ in range(3):
        assert runner(batch, meta).shape == (7, 4)
    assert calls == [[2, 3]] * 3 and runner.stats["eager"] == 3 and not runner.graphs
