"""Per-head q/k RMSNorm + rotary in one in-place pass: the reference against transformers' Qwen3 order
(q_norm, then apply_rotary_pos_emb), the launcher on CPU, the kernel under the interpreter and on a GPU."""
import itertools

import pytest
import torch

from packformer.batch import positions_for
from packformer.ops.qk_norm_rotary import qk_norm_rotary_, qk_norm_rotary_ref
from packformer.ops.rmsnorm import rms_norm_ref
from packformer.ops.rotary import RotaryConfig, apply_rotary_ref, rotary_tables


def _qkv(lens, hq, hk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=g) * 3).to(device, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    w = lambda: (torch.randn(d, generator=g) * 0.3 + 1).to(device, dtype)  # noqa: E731
    return qkv, q, k, w(), w()


def test_ref_is_norm_then_rotary_as_transformers_applies_them():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb
    lens, d = [5, 1, 7], 16
    cfg = RotaryConfig(base=1e6)
    _, q, k, qw, kw = _qkv(lens, 4, 2, d, torch.float64)
    cos, sin = rotary_tables(positions_for(lens), cfg, d, dtype=torch.float64)
    got_q, got_k = qk_norm_rotary_ref(q, k, qw, kw, 1e-6, cos, sin, cfg)
    nq, nk = rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6)
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]   # [1, T, D]
    want_q, want_k = apply_rotary_pos_emb(nq.transpose(0, 1)[None], nk.transpose(0, 1)[None], full_cos, full_sin)
    assert torch.allclose(got_q, want_q[0].transpose(0, 1), atol=1e-12)
    assert torch.allclose(got_k, want_k[0].transpose(0, 1), atol=1e-12)


def test_launcher_on_cpu_works_in_place_on_the_qkv_buffer_and_leaves_v_alone():
    lens, d = [3, 9, 2], 8
    for cfg in (RotaryConfig(base=1e4), RotaryConfig(base=1e4, interleaved=True), RotaryConfig(base=1e4, dim=4)):
        qkv, q, k, qw, kw = _qkv(lens, 4, 2, d)
        before = qkv.clone()
        cos, sin = rotary_tables(positions_for(lens), cfg, d)
        want_q, want_k = qk_norm_rotary_ref(q, k, qw, kw, 1e-6, cos, sin, cfg)
        qk_norm_rotary_(q, k, qw, kw, 1e-6, cos, sin, cfg)
        assert torch.allclose(q, want_q, atol=1e-6) and torch.allclose(k, want_k, atol=1e-6)
        assert torch.equal(qkv[:, 6 * d:], before[:, 6 * d:])


@pytest.mark.parametrize("bad, msg", [
    (dict(q_weight=torch.ones(7)), "q_weight"),
    (dict(k=torch.zeros(4, 5, 8)), "more heads"),
    (dict(cos=torch.zeros(3, 4)), "cos and sin"),
])
def test_launcher_names_the_bad_argument(bad, msg):
    cfg = RotaryConfig()
    args = dict(q=torch.zeros(4, 2, 8), k=torch.zeros(4, 1, 8), q_weight=torch.ones(8), k_weight=torch.ones(8),
                eps=1e-6, cos=torch.zeros(4, 4), sin=torch.zeros(4, 4), cfg=cfg)
    args.update(bad)
    if "cos" in bad:
        args["sin"] = bad["cos"]
    with pytest.raises(ValueError, match=msg):
        qk_norm_rotary_(**args)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.batch import positions_for
        from packformer.ops import _triton
        from packformer.ops.qk_norm_rotary import qk_norm_rotary_, qk_norm_rotary_ref
        from packformer.ops.rotary import RotaryConfig, rotary_tables
        assert _triton.INTERPRET and _triton.kernel_ok(torch.zeros(1))
        g = torch.Generator().manual_seed(3)
        lens, hq, hk, d = [5, 1, 40, 3], 4, 2, 16
        t = sum(lens)
        for dt in (torch.float16, torch.float32):
            for inter in (False, True):
                cfg = RotaryConfig(base=1e6, interleaved=inter)
                qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=g) * 3).to(dt)
                before = qkv.clone()
                q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
                qw, kw = torch.rand(d, generator=g).to(dt) + 0.5, torch.rand(d, generator=g).to(dt) + 0.5
                cos, sin = rotary_tables(positions_for(lens), cfg, d)
                wq, wk = qk_norm_rotary_ref(q, k, qw, kw, 1e-6, cos, sin, cfg)
                qk_norm_rotary_(q, k, qw, kw, 1e-6, cos, sin, cfg)
                tol = 4e-3 if dt == torch.float16 else 1e-5
                assert (q.float() - wq.float()).abs().max() <= tol * 4, (dt, inter)
                assert (k.float() - wk.float()).abs().max() <= tol * 4, (dt, inter)
                assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hk,d", [(16, 8, 128), (3, 1, 256), (12, 12, 64)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_matches_reference_on_gpu(dtype, hq, hk, d, interleaved, near_exact):
    g = torch.Generator().manual_seed(d)
    lens = torch.randint(1, 300, (60,), generator=g).tolist()
    lens = [n for n, end in zip(lens, itertools.accumulate(lens)) if end < 5000]
    cfg = RotaryConfig(base=1e6, interleaved=interleaved)
    qkv, q, k, qw, kw = _qkv(lens, hq, hk, d, dtype, "cuda", seed=hq)
    before = qkv.clone()
    cos, sin = rotary_tables(positions_for(lens).cuda(), cfg, d)
    want_q, want_k = qk_norm_rotary_ref(q, k, qw, kw, 1e-6, cos, sin, cfg)
    exact_q, exact_k = qk_norm_rotary_ref(q.double(), k.double(), qw.double(), kw.double(), 1e-6, cos, sin, cfg)
    qk_norm_rotary_(q, k, qw, kw, 1e-6, cos, sin, cfg)
    near_exact(q, want_q, exact_q)
    near_exact(k, want_k, exact_k)
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])
