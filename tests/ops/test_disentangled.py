"""DeBERTa's disentangled attention (ops/disentangled.py): the bucketed relative index equals
transformers' build_relative_position; the readable reference and the grouped implementation equal
transformers' DisentangledSelfAttention on packed sequences whose lengths straddle every bucket edge;
the grouped one in half precision stays as close to the exact (fp64) result as the reference in that
precision does."""
from __future__ import annotations

import pytest
import torch

from packformer.ops import disentangled as dis
from packformer.ops.attention import AttentionMeta
from packformer.ops.disentangled import (DisentangledConfig, disentangled_attention, disentangled_attention_ref,
                                         distance_index, position_projections)

transformers = pytest.importorskip("transformers")
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta  # noqa: E402

H, NH = 32, 4
CONFIGS = {
    "v3": DisentangledConfig(8, 32, ("p2c", "c2p")),             # log buckets, both terms
    "raw-c2p": DisentangledConfig(-1, 16, ("c2p",)),             # no buckets: distances clipped at +-16
    "p2c": DisentangledConfig(8, 32, ("p2c",)),
    "v3-real": DisentangledConfig(256, 512, ("p2c", "c2p")),     # DeBERTa-v3's own buckets
}


def edge_lengths(cfg: DisentangledConfig, longest: int) -> list[int]:
    """Lengths whose largest distance lies on both sides of every change of the relative index."""
    r = distance_index(cfg, longest)
    c = (r.shape[0] - 1) // 2
    out = {1, 2, longest}
    for d in range(1, longest):
        if r[c + d] != r[c + d - 1] or r[c - d] != r[c - d + 1]:
            out |= {d, d + 1, d + 2}               # largest distance d - 1, d, d + 1
    return sorted(n for n in out if n <= longest)


def _hf_relative_index(cfg: DisentangledConfig, n: int) -> torch.Tensor:
    x = torch.zeros(1, n, 1)
    rel = hf_deberta.build_relative_position(x, x, bucket_size=cfg.position_buckets,
                                             max_position=cfg.max_relative_positions)[0]   # [n, n]
    return (rel + cfg.span).clamp(0, 2 * cfg.span - 1)


@pytest.mark.parametrize("name", CONFIGS)
def test_relative_index_equals_transformers(name):
    cfg = CONFIGS[name]
    n = 700
    r = distance_index(cfg, n)
    c = (r.shape[0] - 1) // 2
    pos = torch.arange(n)
    assert torch.equal(r[pos[:, None] - pos[None, :] + c], _hf_relative_index(cfg, n))


def _hf_attention(cfg: DisentangledConfig, seed=0):
    hcfg = transformers.DebertaV2Config(hidden_size=H, num_attention_heads=NH, relative_attention=True,
                                        position_buckets=cfg.position_buckets,
                                        max_relative_positions=cfg.max_relative_positions,
                                        pos_att_type="|".join(cfg.pos_att_type), share_att_key=True,
                                        max_position_embeddings=512)
    torch.manual_seed(seed)
    att = hf_deberta.DisentangledSelfAttention(hcfg).eval()
    with torch.no_grad():     # peaked scores, so that a wrong term, index or scale shows
        for p in att.parameters():
            p.normal_(0.0, 0.5)
    rel = torch.randn(2 * cfg.span, H)
    return att, rel


def _packed_inputs(att, rel, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), H, generator=g)
    w = torch.cat([att.query_proj.weight, att.key_proj.weight, att.value_proj.weight]).detach()
    b = torch.cat([att.query_proj.bias, att.key_proj.bias, att.value_proj.bias]).detach()
    q, k, v = torch.nn.functional.linear(x, w, b).view(-1, 3, NH, H // NH).unbind(1)
    pq, pk = position_projections(rel, w, b, NH)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, q, k, v, pq, pk, cu


def _hf_packed(att, rel, x, lengths):
    outs, s = [], 0
    for n in lengths:
        xs = x[s:s + n][None]
        with torch.no_grad():
            outs.append(att(xs, torch.ones(1, 1, n, n), rel_embeddings=rel)[0][0])
        s += n
    return torch.cat(outs).view(-1, NH, H // NH)


@pytest.mark.parametrize("name", ["v3", "raw-c2p", "p2c"])
def test_reference_and_grouped_equal_transformers(name):
    cfg = CONFIGS[name]
    att, rel = _hf_attention(cfg)
    lengths = edge_lengths(cfg, 40)
    lengths = lengths + lengths[::3]                        # repeated lengths form groups
    x, q, k, v, pq, pk, cu = _packed_inputs(att, rel, lengths)
    want = _hf_packed(att, rel, x, lengths)
    meta = AttentionMeta.build(cu, max(lengths))
    ref = disentangled_attention_ref(q, k, v, cu, pq, pk, cfg)
    got = disentangled_attention(q, k, v, meta, pq, pk, cfg)
    scale = want.abs().max().item()
    assert (ref - want).abs().max().item() <= 1e-5 * scale
    assert (got - want).abs().max().item() <= 1e-5 * scale


def test_grouped_chunks_gathers_and_views_agree(monkeypatch):
    """Groups whose sequences are not adjacent (gathered rows) and groups split into chunks give what
    adjacent, whole groups give (to rounding: torch picks its small-matrix kernels by the batch size, so
    at this tiny head size the bits may differ); q, k, v as strided views of one QKV buffer are fine."""
    cfg = CONFIGS["v3"]
    att, rel = _hf_attention(cfg)
    lengths = [9, 3, 9, 17, 3, 9, 40]
    x, q, k, v, pq, pk, cu = _packed_inputs(att, rel, lengths)
    meta = AttentionMeta.build(cu, max(lengths))
    whole = disentangled_attention(q, k, v, meta, pq, pk, cfg)
    monkeypatch.setattr(dis, "MAX_CHUNK_ELEMENTS", 1)      # one sequence per chunk
    chunked = disentangled_attention(q, k, v, AttentionMeta.build(cu, max(lengths)), pq, pk, cfg)
    assert (whole - chunked).abs().max().item() <= 1e-6 * whole.abs().max().item()
    ref = disentangled_attention_ref(q, k, v, cu, pq, pk, cfg)
    assert (whole - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_close_to_exact_as_the_reference(dtype, near_exact):
    """What the CUDA path runs (the grouped code in fp16 / bf16): its error against the fp64 result is
    within twice that of the per-sequence reference fed the same rounded inputs."""
    cfg = CONFIGS["v3"]
    att, rel = _hf_attention(cfg)
    with torch.no_grad():
        for p in att.parameters():
            p.mul_(0.4)                                     # scores of a trained model's scale
    lengths = edge_lengths(cfg, 40)
    _, q, k, v, pq, pk, cu = _packed_inputs(att, rel, lengths)
    half = [t.to(dtype) for t in (q, k, v, pq, pk)]
    exact = disentangled_attention_ref(*(t.double() for t in half[:3]), cu, half[3].double(), half[4].double(), cfg)
    ref = disentangled_attention_ref(*half[:3], cu, *half[3:], cfg)      # fp32 math, rounded to dtype
    got = disentangled_attention(*half[:3], AttentionMeta.build(cu, max(lengths)), *half[3:], cfg)
    assert got.dtype == dtype
    near_exact(got.float(), ref.float(), exact)


def test_empty_batch_and_missing_lengths():
    cfg = CONFIGS["v3"]
    pq = pk = torch.zeros(NH, 2 * cfg.span, H // NH)
    empty = torch.zeros(0, NH, H // NH)
    meta = AttentionMeta.build(torch.zeros(1, dtype=torch.int32), 0)
    assert disentangled_attention(empty, empty, empty, meta, pq, pk, cfg).shape == (0, NH, H // NH)
    q = torch.randn(5, NH, H // NH)
    no_lengths = AttentionMeta(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), max_seqlen=5, seqlens=[])
    with pytest.raises(ValueError, match="host-side lengths"):
        disentangled_attention(q, q, q, no_lengths, pq, pk, cfg)


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="share_att_key"):
        DisentangledConfig(share_att_key=False)
    with pytest.raises(ValueError, match="pos_att_type"):
        DisentangledConfig(pos_att_type=("c2p", "p2p"))
    with pytest.raises(ValueError, match="norm_rel_ebd"):
        DisentangledConfig(norm_rel_ebd="batch_norm")
    assert DisentangledConfig(pos_att_type=["p2c", "c2p", "c2p"]).pos_att_type == ("c2p", "p2c")
    assert DisentangledConfig(-1, 16).span == 16 and DisentangledConfig(256, 512).span == 256
