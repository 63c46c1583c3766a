"""PackedBatch: packing, positions, and the pad/unpad round trip at the edges."""
import numpy as np
import pytest
import torch

from packformer.batch import cu_seqlens_from_lengths, pack, pack_padded_ids, pad_input, positions_for, unpad_input


def test_pack_concatenates_sequences_and_marks_boundaries():
    b = pack([[5, 6, 7], [8], [9, 10]])
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3 and b.num_seqs == 3 and b.num_tokens == 6
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1]


def test_positions_restart_at_the_offset_for_roberta_style_models():
    assert positions_for([2, 3], offset=2).tolist() == [2, 3, 2, 3, 4]


def test_empty_batch():
    b = pack([])
    assert b.num_seqs == 0 and b.num_tokens == 0 and b.cu_seqlens.tolist() == [0] and b.max_seqlen == 0


def test_unpad_then_pad_is_identity_on_real_tokens_and_zero_elsewhere():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    packed, idx, cu, maxlen = unpad_input(x, mask)
    assert packed.shape == (9, 4) and cu.tolist() == [0, 3, 8, 9] and maxlen == 5
    back = pad_input(packed, idx, 3, 5)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert torch.count_nonzero(back[~mask.bool()]) == 0


def test_pack_padded_ids_matches_pack_of_the_unpadded_lists():
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1], [0, 5, 6, 7, 8, 2]])
    b, idx = pack_padded_ids(ids, pad_id=1, position_offset=2)
    ref = pack([[0, 7, 8, 2], [0, 9, 2], [0, 5, 6, 7, 8, 2]], position_offset=2)
    assert torch.equal(b.input_ids, ref.input_ids) and torch.equal(b.positions, ref.positions)
    assert torch.equal(b.cu_seqlens, ref.cu_seqlens) and b.max_seqlen == 6


def test_pack_padded_ids_rejects_left_padding_with_a_clear_error():
    with pytest.raises(ValueError, match="right-padded"):
        pack_padded_ids(torch.tensor([[1, 1, 0, 5, 2]]), pad_id=1)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        pack_padded_ids(torch.tensor([0, 5, 2]), pad_id=1)


def test_select_keeps_the_chosen_sequences_in_order():
    b = pack([[1, 2], [3], [4, 5, 6]], order=[10, 11, 12])
    s = b.select([2, 0])
    assert s.input_ids.tolist() == [4, 5, 6, 1, 2] and s.cu_seqlens.tolist() == [0, 3, 5]
    assert s.positions.tolist() == [0, 1, 2, 0, 1] and s.order.tolist() == [12, 10]


def test_cu_seqlens_from_lengths_is_int32_prefix_sums_from_zero():
    cu = cu_seqlens_from_lengths([3, 0, 2])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 5]
    assert cu_seqlens_from_lengths(np.array([4, 1])).tolist() == [0, 4, 5]
    assert cu_seqlens_from_lengths([]).tolist() == [0]


def test_an_empty_sequence_keeps_its_slot():
    b = pack([[1], [], [2, 3]], token_types=[[0], [], [1, 1]])
    assert b.num_seqs == 3 and b.seqlens.tolist() == [1, 0, 2] and b.cu_seqlens.tolist() == [0, 1, 1, 3]
    assert b.positions.tolist() == [0, 0, 1] and b.token_type_ids.tolist() == [0, 1, 1]
    s = b.select([1, 0])
    assert s.seqlens.tolist() == [0, 1] and s.input_ids.tolist() == [1] and s.max_seqlen == 1


def test_roberta_style_positions_number_a_pad_id_inside_a_sequence_as_transformers_does():
    """With position_offset = pad id + 1 (RoBERTa, XLM-R, MPNet), a pad id inside a sequence gets the pad
    position and is skipped by the count, per sequence; without one the positions are plain."""
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    seqs = [[0, 5, 1, 6, 2], [0, 1, 1, 2], [0, 7, 2], [1]]
    got = pack(seqs, position_offset=2).positions
    want = torch.cat([RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor([s]), 1)[0] for s in seqs])
    assert got.tolist() == want.tolist() == [2, 3, 1, 4, 5, 2, 1, 1, 3, 2, 3, 4, 1]
    assert pack([[0, 5, 6, 2], [0, 2]], position_offset=2).positions.tolist() == [2, 3, 4, 5, 2, 3]
    assert pack([[0, 1, 0]], position_offset=0).positions.tolist() == [0, 1, 2]      # BERT: no pad rule
