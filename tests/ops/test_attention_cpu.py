"""The CPU branch of varlen attention: one SDPA call per group of equal-length sequences, reading
strided views of a fused QKV output where the group's sequences are adjacent, gathering them otherwise."""
import pytest
import torch

from packformer.ops.attention import AttentionMeta, group_by_length, varlen_attention, varlen_attention_ref


def _packed(lens, heads=4, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), 3, heads, dim, generator=g).to(dtype)           # [T, 3, nh, hd]
    cu = torch.tensor([0] + list(torch.tensor(lens, dtype=torch.int64).cumsum(0)), dtype=torch.int32)
    return qkv, AttentionMeta.build(cu, max(lens), list(lens))


def test_group_by_length_lists_token_starts_per_length_and_skips_empty_sequences():
    assert group_by_length([3, 0, 2, 3, 2]) == [(2, [3, 8]), (3, [0, 5])]
    assert group_by_length([]) == []


CASES = {
    "adjacent groups (sorted batch)": [9, 9, 9, 5, 5, 1],
    "non-adjacent equal lengths": [5, 9, 5, 1, 9, 9],
    "all one length": [7, 7, 7, 7],
    "single sequence": [33],
    "empty sequences inside": [4, 0, 6, 0, 4],
    "all lengths distinct": [1, 2, 3, 50, 17],
}


@pytest.mark.parametrize("lens", CASES.values(), ids=CASES.keys())
def test_matches_the_per_sequence_fp32_reference_on_strided_qkv_views(lens):
    qkv, meta = _packed(lens)
    q, k, v = qkv.unbind(1)                 # row stride 3*nh*hd, as the encoders pass them
    got = varlen_attention(q, k, v, meta)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5


def test_bf16_stays_within_bf16_rounding_of_the_fp32_reference():
    qkv, meta = _packed([5, 9, 5, 12, 9], dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    got = varlen_attention(q, k, v, meta)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2e-2


def test_a_sequence_does_not_depend_on_what_else_is_in_its_batch():
    lens = [12, 30, 12, 7, 30]
    qkv, meta = _packed(lens)
    q, k, v = qkv.unbind(1)
    together = varlen_attention(q, k, v, meta)
    start = 0
    for n in lens:
        alone_meta = AttentionMeta.build(torch.tensor([0, n], dtype=torch.int32), n, [n])
        alone = varlen_attention(q[start:start + n], k[start:start + n], v[start:start + n], alone_meta)
        assert (together[start:start + n] - alone).abs().max() <= 1e-6
        start += n


def test_meta_without_cpu_groups_still_covers_every_row():
    # a meta built for another device carries no CPU groups: the CPU path regroups, never skips rows
    qkv, meta = _packed([3, 8, 3])
    meta.groups = None
    q, k, v = qkv.unbind(1)
    got = varlen_attention(q, k, v, meta)
    assert (got - varlen_attention_ref(q, k, v, meta.cu_seqlens)).abs().max() <= 1e-5


def test_mismatched_shapes_raise_a_clear_error():
    qkv, meta = _packed([4, 4])
    q, k, _ = qkv.unbind(1)
    with pytest.raises(ValueError, match="one \\[T, H, D\\] shape"):
        varlen_attention(q, k, k[:, :2], meta)
