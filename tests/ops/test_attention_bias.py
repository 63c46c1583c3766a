"""Position-dependent attention terms (`PositionBias`) on CPU: the fp32 reference against a padded
HF-style computation, the grouped SDPA path against the reference, batch independence, the per-meta mask
cache, long windowed sequences in query blocks, and the argument checks. The Triton kernel's checks are in
test_flash_varlen.py."""
import math

import pytest
import torch

from packformer.ops.attention import (AttentionMeta, PositionBias, _cpu_grouped_sdpa,
                                      _cpu_grouped_sdpa_any_device, position_mask, varlen_attention,
                                      varlen_attention_ref)

R = 128        # MPNet: relative_attention_num_buckets 32, max_distance 128
WINDOW = 64    # ModernBERT's local layers
EDGE_LENS = [1, 2, 63, 64, 65, 129, 130, 200]   # both sides of the window and of R


def _packed(lens, heads=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), 3, heads, dim, generator=g).to(dtype)           # [T, 3, H, D]
    cu = torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    return qkv.unbind(1), AttentionMeta.build(cu, max(lens), list(lens))


def _mpnet_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = R) -> torch.Tensor:
    """HF MPNet's relative_position_bucket (checked against transformers below): rel = key - query."""
    n = -rel
    num_buckets //= 2
    ret = (n < 0).long() * num_buckets
    n = n.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    return ret + torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


def _mpnet_embedding(heads: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(32, heads, generator=torch.Generator().manual_seed(seed))        # [buckets, H]


def _mpnet_table(emb: torch.Tensor) -> torch.Tensor:
    """[H, 2R+1]: MPNet's bucketed bias for every relative position in [-R, R]; beyond R its bucket is
    the last one, which is what clamping to the table's edge gives."""
    return emb[_mpnet_bucket(torch.arange(-R, R + 1))].T.contiguous()                   # [H, 2R+1]


def _padded_hf_style(q, k, v, lens, scale, emb=None, window=0):
    """What a padded HF encoder computes: [B, L] padding, dense [B, H, L, L] bias and masks, softmax."""
    b, lmax, (_, h, d) = len(lens), max(lens), q.shape
    qp, kp, vp = (torch.zeros(b, lmax, h, d) for _ in range(3))
    keep = torch.zeros(b, lmax, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lens):
        for src, dst in ((q, qp), (k, kp), (v, vp)):
            dst[i, :n] = src[start:start + n]
        keep[i, :n] = True
        start += n
    qp, kp, vp = (x.transpose(1, 2) for x in (qp, kp, vp))                              # [B, H, L, D]
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(d) if scale is None else qp @ kp.transpose(-1, -2) * scale
    pos = torch.arange(lmax)
    rel = pos[None, :] - pos[:, None]                                                    # [L, L]
    if emb is not None:   # MPNet: compute_position_bias -> [B, H, L, L], added after the 1/sqrt(d) scaling
        scores = scores + emb[_mpnet_bucket(rel)].permute(2, 0, 1)[None].expand(b, -1, -1, -1)
    scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)  # key padding
    if window:
        scores = scores.masked_fill((rel.abs() > window)[None, None], torch.finfo(scores.dtype).min)
    out = (torch.softmax(scores, -1) @ vp).transpose(1, 2)                               # [B, L, H, D]
    return torch.cat([out[i, :n] for i, n in enumerate(lens)])                           # [T, H, D]


def test_the_local_bucket_function_is_mpnets():
    mpnet = pytest.importorskip("transformers.models.mpnet.modeling_mpnet")
    rel = torch.arange(-600, 601)
    assert torch.equal(_mpnet_bucket(rel), mpnet.MPNetEncoder.relative_position_bucket(rel))


def test_a_table_of_radius_128_reproduces_mpnets_bucketed_bias_at_every_distance():
    emb = _mpnet_embedding(3)
    bias = PositionBias(_mpnet_table(emb))
    pos = torch.arange(600)
    dense = emb[_mpnet_bucket(pos[None, :] - pos[:, None])].permute(2, 0, 1)            # [H, L, L]
    assert torch.equal(position_mask(bias, 600)[0], dense)


@pytest.mark.parametrize("kind", ["bias", "window", "both"])
def test_reference_matches_a_padded_hf_style_computation(kind):
    (q, k, v), meta = _packed(EDGE_LENS)
    emb = _mpnet_embedding(q.shape[1]) if kind != "window" else None
    window = WINDOW if kind != "bias" else 0
    bias = PositionBias(_mpnet_table(emb) if emb is not None else None, window)
    got = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    want = _padded_hf_style(q, k, v, EDGE_LENS, None, emb, window)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _biases(heads, radius=5, window=6, seed=2):
    table = torch.randn(heads, 2 * radius + 1, generator=torch.Generator().manual_seed(seed))
    return {"bias": PositionBias(table), "window": PositionBias(window=window), "both": PositionBias(table, window)}


CASES = {   # chosen to reach every branch of _cpu_grouped_sdpa; window 6 and R 5 fall inside most lengths
    "adjacent groups (sorted batch)": [9, 9, 9, 5, 5, 1],
    "non-adjacent equal lengths (gather)": [5, 9, 5, 1, 9, 9],
    "one length fills the batch (single-group branch)": [13, 13, 13],
    "single sequence": [33],
    "empty sequences inside": [4, 0, 20, 0, 4],
    "around window and radius": [1, 2, 5, 6, 7, 11, 12, 13, 40],
}


@pytest.mark.parametrize("kind", ["bias", "window", "both"])
@pytest.mark.parametrize("lens", CASES.values(), ids=CASES.keys())
def test_grouped_sdpa_matches_the_reference(lens, kind):
    (q, k, v), meta = _packed(lens, heads=3)
    bias = _biases(3)[kind]
    got = varlen_attention(q, k, v, meta, bias=bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the direct entry point (the CPU fast path's) takes the bias positionally after the scale
    direct = _cpu_grouped_sdpa(q, k, v, meta, 1.0 / math.sqrt(q.shape[-1]), bias)
    assert torch.equal(direct, got)


@pytest.mark.parametrize("kind", ["bias", "window", "both"])
def test_the_per_sequence_path_for_other_devices_matches_the_reference(kind):
    lens = CASES["around window and radius"]
    (q, k, v), meta = _packed(lens, heads=3)
    bias = _biases(3)[kind]
    got = _cpu_grouped_sdpa_any_device(q, k, v, meta, 1.0 / math.sqrt(q.shape[-1]), bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_custom_scale_is_applied_before_the_bias():
    (q, k, v), meta = _packed([7, 12, 7], heads=3)
    bias = _biases(3)["both"]
    got = varlen_attention(q, k, v, meta, 0.37, bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, 0.37, bias)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    hf = _padded_hf_style(q, k, v, [7, 12, 7], 0.37)   # with no bias, both agree with the padded form
    assert (varlen_attention_ref(q, k, v, meta.cu_seqlens, 0.37) - hf).abs().max() <= 1e-5


def test_bf16_with_a_bias_stays_within_bf16_rounding_of_the_fp32_reference():
    (q, k, v), meta = _packed([5, 9, 5, 12, 9], heads=3, dtype=torch.bfloat16)
    bias = _biases(3)["both"]
    got = varlen_attention(q, k, v, meta, bias=bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2e-2


def _assert_alone_as_in_the_batch(q, k, v, lens, together, bias):
    start = 0
    for n in lens:
        alone_meta = AttentionMeta.build(torch.tensor([0, n], dtype=torch.int32), n, [n])
        alone = varlen_attention(q[start:start + n], k[start:start + n], v[start:start + n], alone_meta, bias=bias)
        assert torch.equal(together[start:start + n], alone), n
        start += n


@pytest.mark.parametrize("kind", ["bias", "window", "both"])
def test_a_sequence_gives_the_same_bits_alone_and_inside_a_batch(kind):
    lens = [12, 30, 12, 7, 30, 45]       # gathered and adjacent groups; the longest sets the cached mask
    (q, k, v), meta = _packed(lens, heads=3)
    bias = _biases(3)[kind]
    _assert_alone_as_in_the_batch(q, k, v, lens, varlen_attention(q, k, v, meta, bias=bias), bias)


def test_no_bias_and_an_empty_bias_change_nothing():
    (q, k, v), meta = _packed([5, 9, 5, 1, 9, 9], heads=3)
    plain = varlen_attention(q, k, v, meta)
    assert torch.equal(varlen_attention(q, k, v, meta, None, None), plain)
    assert torch.equal(varlen_attention(q, k, v, meta, bias=PositionBias()), plain)
    assert meta.masks == {}
    assert torch.equal(varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=PositionBias()),
                       varlen_attention_ref(q, k, v, meta.cu_seqlens))


def test_a_window_that_covers_a_sequence_adds_no_mask_for_it():
    (q, k, v), meta = _packed([5, 9, 5, 1], heads=3)
    plain = varlen_attention(q, k, v, meta)
    assert torch.equal(varlen_attention(q, k, v, meta, bias=PositionBias(window=8)), plain)
    assert meta.masks == {}                                # every sequence fits: no mask was built
    got = varlen_attention(q, k, v, meta, bias=PositionBias(window=5))   # only the 9-token group is masked
    assert torch.equal(got[:5], plain[:5]) and torch.equal(got[14:], plain[14:])
    assert (got - varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=PositionBias(window=5))).abs().max() <= 1e-5


def test_the_meta_builds_one_mask_per_forward_and_each_group_reads_its_corner():
    lens = [12, 30, 12, 7, 30]
    (q, k, v), meta = _packed(lens, heads=3)
    biases = _biases(3)
    for _layer in range(3):                        # the layers of one forward share the meta
        varlen_attention(q, k, v, meta, bias=biases["both"])
    assert len(meta.masks) == 1
    (table, _version, mask), = meta.masks.values()
    assert table is biases["both"].table and mask.shape == (1, 3, 30, 30)
    assert torch.equal(mask[..., :7, :7], position_mask(biases["both"], 7))
    varlen_attention(q, k, v, meta, bias=biases["window"])            # a window alone: one [1, 1, L, L]
    assert len(meta.masks) == 2
    assert meta.masks_for(biases["window"], 30).shape == (1, 1, 30, 30)


LONG_LENS = [600, 40, 1100, 511, 600, 512, 40]     # ModernBERT's window 64: from 512 tokens on, query blocks


@pytest.mark.parametrize("kind", ["window", "both", "causal window"])
def test_long_windowed_sequences_run_in_query_blocks_without_an_l_by_l_mask(kind):
    """Past a few windows' length, a windowed sequence runs in blocks of 128 queries against the keys their
    window reaches: the reference's results, the same bits alone as in a batch, and no [L, L] mask."""
    from packformer.ops.attention import WINDOW_BLOCK, _windowed

    table = torch.randn(3, 2 * 5 + 1, generator=torch.Generator().manual_seed(3))
    bias = {"window": PositionBias(window=WINDOW), "both": PositionBias(table, WINDOW),
            "causal window": PositionBias(window=WINDOW, causal=True)}[kind]
    assert WINDOW_BLOCK == 128 and not _windowed(bias, 511) and _windowed(bias, 512)
    (q, k, v), meta = _packed(LONG_LENS, heads=3)
    got = varlen_attention(q, k, v, meta, bias=bias)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-5 * want.abs().max()
    (_t, _v, mask), = meta.masks.values()      # only the sequences below 512 tokens read the cached mask
    assert mask.shape[-1] == 511
    _assert_alone_as_in_the_batch(q, k, v, LONG_LENS, got, bias)


def test_query_blocks_serve_grouped_query_attention_and_bf16():
    lens = [700, 700, 64]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens), 4, 16, generator=g)
    k, v = (torch.randn(sum(lens), 2, 16, generator=g) for _ in range(2))
    meta = AttentionMeta.build(torch.tensor([0, 700, 1400, 1464], dtype=torch.int32), 700, lens)
    bias = PositionBias(window=WINDOW)
    want = varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)
    assert (varlen_attention(q, k, v, meta, bias=bias) - want).abs().max() <= 1e-5 * want.abs().max()
    meta16 = AttentionMeta.build(meta.cu_seqlens, 700, lens)
    got16 = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), meta16, bias=bias)
    assert got16.dtype == torch.bfloat16 and (got16.float() - want).abs().max() <= 3e-2


def test_the_mask_cache_follows_an_in_place_update_of_the_table():
    (q, k, v), meta = _packed([12, 30, 12], heads=3)
    bias = _biases(3)["bias"]
    before = varlen_attention(q, k, v, meta, bias=bias)
    with torch.no_grad():
        bias.table.mul_(2.0)
    after = varlen_attention(q, k, v, meta, bias=bias)
    assert not torch.equal(before, after)
    assert (after - varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=bias)).abs().max() <= 1e-5


def test_bad_tables_and_windows_raise_clear_errors():
    (q, k, v), meta = _packed([4, 6], heads=3)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        PositionBias(window=-1)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        PositionBias(window=2.5)
    with pytest.raises(ValueError, match=r"fp32 \[H, 2R\+1\]"):
        PositionBias(torch.zeros(3, 4))                                # even width: no centre column
    with pytest.raises(ValueError, match=r"fp32 \[H, 2R\+1\]"):
        PositionBias(torch.zeros(7))
    with pytest.raises(ValueError, match=r"fp32 \[H, 2R\+1\]"):
        PositionBias(torch.zeros(3, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[H=3, 2R\+1\] on cpu"):
        varlen_attention(q, k, v, meta, bias=PositionBias(torch.zeros(2, 5)))       # wrong head count
    with pytest.raises(ValueError, match=r"\[H=3, 2R\+1\] on cpu"):
        varlen_attention(q, k, v, meta, bias=PositionBias(torch.zeros(3, 5, device="meta")))
    with pytest.raises(ValueError, match=r"\[H=3, 2R\+1\] on cpu"):
        varlen_attention_ref(q, k, v, meta.cu_seqlens, bias=PositionBias(torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="PositionBias"):
        varlen_attention(q, k, v, meta, bias=torch.zeros(3, 5))
