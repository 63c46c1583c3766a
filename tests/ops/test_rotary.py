"""Rotary position embeddings on packed q, k: the tables and the reference against transformers (packed
vs padded), the interleaved layout against complex multiplication, partial rotary, GTE's NTK scaling, the
in-place CPU path, the Triton kernel under the interpreter and on a GPU."""
import itertools

import pytest
import torch

from packformer.batch import positions_for
from packformer.ops.rotary import RotaryConfig, apply_rotary_, apply_rotary_ref, rotary_inv_freq, rotary_tables

LENS = [5, 1, 9, 3]


def _padded(lens, heads, dim, dtype=torch.float32, seed=0):
    """Random q, k [B, L, H, D] with a validity mask [B, L] (padding is garbage, not zeros)."""
    g = torch.Generator().manual_seed(seed)
    b, l = len(lens), max(lens)
    q = torch.randn(b, l, heads, dim, generator=g).to(dtype)
    k = torch.randn(b, l, heads, dim, generator=g).to(dtype)
    mask = torch.arange(l)[None, :] < torch.tensor(lens)[:, None]
    return q, k, mask


def _hf_modernbert_rope(head_dim, heads, theta_layer):
    from transformers import ModernBertConfig
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding
    cfg = ModernBertConfig(hidden_size=head_dim * heads, num_attention_heads=heads, num_hidden_layers=2,
                           intermediate_size=32)
    theta = cfg.rope_parameters[theta_layer]["rope_theta"]
    rope = ModernBertRotaryEmbedding(cfg)
    return theta, lambda x, pos: rope(x, pos, theta_layer)


# --- configuration ---------------------------------------------------------------------------------------

def test_config_rejects_bad_fields_with_clear_errors():
    with pytest.raises(ValueError, match="even"):
        RotaryConfig(dim=7)
    with pytest.raises(ValueError, match="even"):
        RotaryConfig(dim=0)
    with pytest.raises(ValueError, match="base"):
        RotaryConfig(base=0.0)
    with pytest.raises(ValueError, match="unsupported rotary scaling"):
        RotaryConfig(scaling="yarn", scaling_factor=2.0)
    with pytest.raises(ValueError, match="needs a scaling type"):
        RotaryConfig(scaling_factor=2.0)
    with pytest.raises(ValueError, match=">= 1"):
        RotaryConfig(scaling="ntk", scaling_factor=0.5)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        RotaryConfig(dim=64).rot_dim(32)
    with pytest.raises(ValueError, match="even"):
        RotaryConfig().rot_dim(15)                    # the whole of an odd head cannot be paired
    assert RotaryConfig(dim=16).rot_dim(64) == 16 and RotaryConfig().rot_dim(64) == 64


# --- tables and reference against transformers -----------------------------------------------------------

@pytest.mark.parametrize("layer", ["full_attention", "sliding_attention"])     # ModernBERT's two thetas
def test_tables_match_transformers_modernbert_to_the_last_bit(layer):
    pytest.importorskip("transformers")
    theta, hf_rope = _hf_modernbert_rope(32, 2, layer)
    pos = positions_for(LENS)                                                  # [T], restarting per sequence
    cos, sin = rotary_tables(pos, RotaryConfig(base=theta), 32)
    assert cos.shape == sin.shape == (sum(LENS), 16) and cos.dtype == torch.float32
    hf_cos, hf_sin = hf_rope(torch.zeros(1), pos[None])                        # [1, T, 32]: (freqs, freqs)
    assert torch.equal(hf_cos[0], torch.cat([cos, cos], -1)) and torch.equal(hf_sin[0], torch.cat([sin, sin], -1))
    # tables in the model's dtype are transformers' cast of the fp32 ones
    cos16, _ = rotary_tables(pos, RotaryConfig(base=theta), 32, dtype=torch.bfloat16)
    assert torch.equal(cos16, hf_rope(torch.zeros(1, dtype=torch.bfloat16), pos[None])[0][0, :, :16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_on_packed_rows_equals_transformers_on_the_padded_batch(dtype):
    """transformers rotates a padded [B, L, H, D] batch with cos/sin per (sequence, position); the packed
    rows, rotated with per-row positions that restart at 0, are the same numbers bit for bit (in bf16 with
    bf16 tables, the cos/sin rounding transformers applies there)."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb as modernbert_apply
    theta, hf_rope = _hf_modernbert_rope(32, 2, "full_attention")
    q, k, mask = _padded(LENS, 2, 32, dtype)
    position_ids = torch.arange(q.shape[1]).expand(q.shape[0], -1)            # [B, L]
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=dtype), position_ids)       # [B, L, D]
    hf_q, hf_k = modernbert_apply(q, k, hf_cos, hf_sin, unsqueeze_dim=2)     # q, k are [B, L, H, D] here

    cfg = RotaryConfig(base=theta)
    cos, sin = rotary_tables(positions_for(LENS), cfg, 32, dtype=dtype)
    pq, pk = q[mask], k[mask]                                                  # packed [T, H, D]
    rq, rk = apply_rotary_ref(pq, pk, cos, sin, cfg)
    assert torch.equal(rq, hf_q[mask]) and torch.equal(rk, hf_k[mask])
    if dtype == torch.float32:                                                 # the Llama form (math in q's dtype)
        lq, lk = llama_apply(q, k, hf_cos, hf_sin, unsqueeze_dim=2)
        assert torch.equal(rq, lq[mask]) and torch.equal(rk, lk[mask])
    # the in-place path (plain torch here) writes the same numbers into q and k
    q_ptr = pq.data_ptr()
    apply_rotary_(pq, pk, cos, sin, cfg)
    assert pq.data_ptr() == q_ptr and torch.equal(pq, rq) and torch.equal(pk, rk)


def test_partial_rotary_matches_gpt_neox_and_leaves_the_tail_dims_unchanged():
    pytest.importorskip("transformers")
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb
    hf_cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, rotary_pct=0.25, num_hidden_layers=1,
                           intermediate_size=32)                              # head 32, 8 rotated dims
    q, k, mask = _padded(LENS, 2, 32)
    hf_cos, hf_sin = GPTNeoXRotaryEmbedding(hf_cfg)(q, torch.arange(q.shape[1]).expand(q.shape[0], -1))
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin, unsqueeze_dim=2)

    cfg = RotaryConfig(base=hf_cfg.rope_parameters["rope_theta"], dim=8)
    cos, sin = rotary_tables(positions_for(LENS), cfg, 32)
    assert cos.shape == (sum(LENS), 4)
    rq, rk = apply_rotary_ref(q[mask], k[mask], cos, sin, cfg)
    assert torch.equal(rq, hf_q[mask]) and torch.equal(rk, hf_k[mask])
    assert torch.equal(rq[..., 8:], q[mask][..., 8:]) and not torch.equal(rq[..., :8], q[mask][..., :8])


def test_interleaved_layout_is_complex_multiplication_of_adjacent_pairs():
    """Interleaved: (x[2i] + j x[2i+1]) * e^(j angle_i), and the same rotation as the rotate_half layout
    once each pair's two dims are moved to i and i + dim/2."""
    g = torch.Generator().manual_seed(1)
    t, h, d, rot = 11, 3, 16, 12
    q, k = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    cfg = RotaryConfig(dim=rot, interleaved=True)
    cos, sin = rotary_tables(torch.arange(t), cfg, d)
    rq, rk = apply_rotary_ref(q, k, cos, sin, cfg)
    turn = torch.complex(cos.double(), sin.double())[:, None, :]                          # [T, 1, rot/2]
    for x, got in ((q, rq), (k, rk)):
        want = torch.view_as_real(torch.view_as_complex(x[..., :rot].reshape(t, h, rot // 2, 2).contiguous()) * turn)
        assert torch.allclose(got[..., :rot], want.reshape(t, h, rot), rtol=0, atol=1e-12)
        assert torch.equal(got[..., rot:], x[..., rot:])
    perm = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, d)])  # pairs -> halves
    nq, _ = apply_rotary_ref(q[..., perm], k[..., perm], cos, sin, RotaryConfig(dim=rot))
    assert torch.equal(nq, rq[..., perm])


# --- GTE's NTK scaling -----------------------------------------------------------------------------------

def test_ntk_scaling_is_gte_fixed_ntk():
    """GTE (rope_scaling {"type": "ntk", "factor": f}): base -> base * f, and every frequency / f ** (2 / dim),
    so frequency i is divided by f ** ((2i + 2) / dim): the slowest by f, the fastest by f ** (2 / dim);
    fixed, whatever the sequence length."""
    d, base, f = 64, 500000.0, 2.0                                             # gte-base-en-v1.5
    cfg = RotaryConfig(base=base, scaling="ntk", scaling_factor=f)
    inv = rotary_inv_freq(cfg, d)
    gte = 1.0 / ((base * f) ** (torch.arange(0, d, 2).float() / d))  # as GTE's remote code writes it
    assert torch.equal(inv, gte / f ** (2 / d))
    plain = rotary_inv_freq(RotaryConfig(base=base), d)
    ratio = (plain.double() / inv.double())
    assert torch.allclose(ratio, f ** ((torch.arange(0, d, 2, dtype=torch.float64) + 2) / d), rtol=1e-6)
    assert abs(ratio[-1].item() - f) < 1e-5 and abs(ratio[0].item() - f ** (2 / d)) < 1e-6
    assert torch.equal(rotary_inv_freq(RotaryConfig(base=base, scaling="ntk"), d), plain)     # factor 1: none
    cos, _ = rotary_tables(positions_for([3, 700]), cfg, d)                   # one sequence's rows do not
    assert torch.equal(cos[:3], rotary_tables(positions_for([3]), cfg, d)[0])  # depend on the batch


# --- the in-place launcher -------------------------------------------------------------------------------

def _qkv(t, h, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, 3, h, d, generator=g) * 2).to(dtype)


def test_in_place_cpu_path_rotates_strided_views_of_one_qkv_buffer():
    cfg = RotaryConfig(dim=8, interleaved=True)
    qkv = _qkv(sum(LENS), 3, 16, torch.float16)
    v0 = qkv[:, 2].clone()
    q, k, v = qkv.unbind(1)                                                    # row stride 3 * H * D
    cos, sin = rotary_tables(positions_for(LENS), cfg, 16)
    want_q, want_k = apply_rotary_ref(q, k, cos, sin, cfg)
    out_q, out_k = apply_rotary_(q, k, cos, sin, cfg)
    assert out_q is q and out_k is k
    assert torch.equal(qkv[:, 0], want_q) and torch.equal(qkv[:, 1], want_k) and torch.equal(qkv[:, 2], v0)
    empty = torch.zeros(0, 3, 16)
    assert apply_rotary_(empty, empty.clone(), torch.zeros(0, 4), torch.zeros(0, 4), cfg)[0].shape == (0, 3, 16)


def test_launcher_rejects_bad_arguments():
    cfg = RotaryConfig()
    q, k, _ = _qkv(6, 2, 16).unbind(1)
    cos, sin = rotary_tables(torch.arange(6), cfg, 16)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        apply_rotary_(q, k[:5], cos, sin, cfg)
    with pytest.raises(ValueError, match="dtype"):
        apply_rotary_(q, k.half(), cos, sin, cfg)
    with pytest.raises(ValueError, match="dim/2"):
        apply_rotary_(q, k, cos[:, :4], sin[:, :4], cfg)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        apply_rotary_(q, k, cos, sin, RotaryConfig(dim=32))
    with pytest.raises(ValueError, match="contiguous last"):
        apply_rotary_(torch.zeros(6, 2, 16, 2)[..., 0], k, cos, sin, cfg)
    with pytest.raises(ValueError, match="contiguous"):
        apply_rotary_(q, k, cos.t().contiguous().t(), sin, cfg)
    with pytest.raises(ValueError, match="one device"):
        apply_rotary_(q, k, cos.to("meta"), sin.to("meta"), cfg)
    with pytest.raises(ValueError, match="distinct"):
        apply_rotary_(q, q, cos, sin, cfg)
    with pytest.raises(ValueError, match="integer"):
        rotary_tables(torch.arange(6.0), cfg, 16)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops.rotary import RotaryConfig, apply_rotary_, apply_rotary_ref, rotary_tables
        from packformer.batch import positions_for
        lens = [3, 1, 6]
        t, h, d = sum(lens), 3, 16
        g = torch.Generator().manual_seed(0)
        for interleaved in (False, True):
            for dim in (None, 8):                                   # whole head, and a partial rotary
                cfg = RotaryConfig(base=10000.0, dim=dim, interleaved=interleaved)
                cos, sin = rotary_tables(positions_for(lens), cfg, d)
                for dt in (torch.float32, torch.float16, torch.bfloat16):
                    qkv = (torch.randn(t, 3, h, d, generator=g) * 3).to(dt)
                    before = qkv.clone()
                    q, k, v = qkv.unbind(1)                         # strided views of one QKV buffer
                    want_q, want_k = apply_rotary_ref(q, k, cos, sin, cfg)
                    apply_rotary_(q, k, cos, sin, cfg)
                    for got, want in ((qkv[:, 0], want_q), (qkv[:, 1], want_k)):
                        err = (got.double() - want.double()).abs()
                        if dt == torch.float32:
                            assert err.max() <= 1e-6, (interleaved, dim, err.max())
                        else:  # one unit of the dtype's rounding (the interpreter truncates to bf16)
                            ulp = torch.finfo(dt).eps * torch.maximum(got.double().abs(), want.double().abs())
                            assert (err <= ulp).all(), (interleaved, dim, dt, err.max())
                    assert torch.equal(qkv[:, 2], before[:, 2])
                    rot = cfg.rot_dim(d)
                    assert torch.equal(qkv[:, :2, :, rot:], before[:, :2, :, rot:])
        # k with fewer heads than q (grouped keys) and fp16 tables; T == 0 launches nothing
        cfg = RotaryConfig(dim=8)
        cos, sin = rotary_tables(torch.arange(4), cfg, 16, dtype=torch.float16)
        q, k = torch.randn(4, 4, 16, generator=g), torch.randn(4, 1, 16, generator=g)
        want_q, want_k = apply_rotary_ref(q, k, cos, sin, cfg)
        apply_rotary_(q, k, cos, sin, cfg)
        assert (q - want_q).abs().max() <= 1e-6 and (k - want_k).abs().max() <= 1e-6
        empty = torch.zeros(0, 2, 16)
        apply_rotary_(empty, empty.clone(), torch.zeros(0, 4), torch.zeros(0, 4), cfg)
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d,dim", [(64, None), (128, 64)])
def test_kernel_matches_reference_on_gpu(dtype, interleaved, d, dim, near_exact):
    g = torch.Generator().manual_seed(d)
    lens = torch.randint(1, 200, (100,), generator=g).tolist()                # T = 5000 packed rows
    lens = [n for n, end in zip(lens, itertools.accumulate(lens)) if end < 5000]
    lens.append(5000 - sum(lens))
    t, h = sum(lens), 12
    cfg = RotaryConfig(base=160000.0, dim=dim, interleaved=interleaved)
    cos, sin = rotary_tables(positions_for(lens).cuda(), cfg, d)
    qkv = (torch.randn(t, 3, h, d, generator=g) * 3).to("cuda", dtype)
    before = qkv.clone()
    q, k, v = qkv.unbind(1)
    want_q, want_k = apply_rotary_ref(q, k, cos, sin, cfg)
    exact_q, exact_k = apply_rotary_ref(q.double(), k.double(), cos, sin, cfg)   # fp64 from the same tables
    apply_rotary_(q, k, cos, sin, cfg)
    near_exact(qkv[:, 0], want_q, exact_q)
    near_exact(qkv[:, 1], want_k, exact_k)
    assert torch.equal(qkv[:, 2], before[:, 2])
    rot = cfg.rot_dim(d)
    assert torch.equal(qkv[:, :2, :, rot:], before[:, :2, :, rot:])
