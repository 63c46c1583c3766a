"""Fused (bias +) (sandwich norm +) (residual +) RMSNorm: the reference against torch's rms_norm and the
model's RMSNorm, the launcher on CPU, the Triton kernel under the interpreter and on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from packformer.model import RMSNorm
from packformer.ops.rmsnorm import add_rmsnorm, add_rmsnorm_ref


def _inputs(t, h, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    return mk(t, h, scale=3.0), mk(t, h), mk(h), mk(h, scale=0.5) + 1, mk(h, scale=0.5) + 1


def test_ref_is_rms_norm_of_the_sum_of_its_inputs():
    x, r, xb, w, _ = _inputs(5, 24, torch.float64)
    want = F.rms_norm(x + xb + r, (24,), w, 1e-6)
    assert torch.allclose(add_rmsnorm_ref(x, w, 1e-6, residual=r, x_bias=xb), want, atol=1e-12)
    assert torch.allclose(add_rmsnorm_ref(x, w, 1e-6), F.rms_norm(x, (24,), w, 1e-6), atol=1e-12)


def test_ref_sandwich_normalises_the_sublayer_output_before_the_residual_add():
    x, r, xb, w, pw = _inputs(4, 32, torch.float64)
    s = r + F.rms_norm(x + xb, (32,), pw, 1e-5)
    y, got_s = add_rmsnorm_ref(x, w, 1e-6, residual=r, x_bias=xb, post_weight=pw, post_eps=1e-5, return_sum=True)
    assert torch.allclose(got_s, s, atol=1e-12) and torch.allclose(y, F.rms_norm(s, (32,), w, 1e-6), atol=1e-12)


def test_ref_without_weight_returns_the_sum():
    x, r, xb, _, _ = _inputs(3, 16, torch.float32)
    assert torch.allclose(add_rmsnorm_ref(x, None, 1e-6, residual=r, x_bias=xb), x + xb + r)


def test_ref_matches_the_models_rmsnorm_in_half_precision():
    x, _, _, w, _ = _inputs(6, 64, torch.bfloat16)
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data.copy_(w.float())
    assert torch.equal(add_rmsnorm_ref(x, w.float(), 1e-6), norm(x))


def test_launcher_on_cpu_runs_the_reference_and_writes_the_sum_in_place():
    x, r, xb, w, pw = _inputs(6, 40, torch.float32)
    want_y, want_s = add_rmsnorm_ref(x, w, 1e-6, residual=r, x_bias=xb, post_weight=pw, return_sum=True)
    res = r.clone()
    out = torch.full_like(x, float("nan"))
    y, s = add_rmsnorm(x, w, 1e-6, residual=res, x_bias=xb, post_weight=pw, return_sum=True, out=out, sum_out=res)
    assert y is out and s is res
    assert torch.allclose(y, want_y) and torch.allclose(s, want_s)


@pytest.mark.parametrize("bad, msg", [
    (dict(residual=torch.zeros(6, 39)), "residual"),
    (dict(x_bias=torch.zeros(41)), "x_bias"),
    (dict(post_weight=torch.zeros(8)), "post_weight"),
    (dict(out=torch.zeros(6, 40, dtype=torch.float64)), "dtype"),
])
def test_launcher_names_the_bad_argument(bad, msg):
    x, _, _, w, _ = _inputs(6, 40, torch.float32)
    with pytest.raises(ValueError, match=msg):
        add_rmsnorm(x, w, 1e-6, **bad)


def test_launcher_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        add_rmsnorm(torch.zeros(2, 3, 4), torch.ones(4), 1e-6)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.rmsnorm import add_rmsnorm, add_rmsnorm_ref
        assert _triton.INTERPRET and _triton.kernel_ok(torch.zeros(1))
        g = torch.Generator().manual_seed(1)
        for dt in (torch.float16, torch.float32):
            for h in (48, 100):
                x, r = torch.randn(7, h, generator=g).to(dt) * 3, torch.randn(7, h, generator=g).to(dt)
                xb, w, pw = (torch.randn(h, generator=g).to(dt) for _ in range(3))
                tol = 4e-3 if dt == torch.float16 else 1e-5
                for kw in (dict(), dict(post_weight=pw, post_eps=1e-5)):
                    res = r.clone()
                    out = torch.full_like(x, float("nan"))
                    y, s = add_rmsnorm(x, w, 1e-6, residual=res, x_bias=xb, return_sum=True, out=out, sum_out=res, **kw)
                    yr, sr = add_rmsnorm_ref(x, w, 1e-6, residual=r, x_bias=xb, return_sum=True, **kw)
                    assert y is out and s is res and torch.isfinite(y).all()
                    assert (y.float() - yr.float()).abs().max() <= tol * 4, (dt, h, kw.keys())
                    assert (s.float() - sr.float()).abs().max() <= tol * 8, (dt, h, kw.keys())
                y = add_rmsnorm(x, None, 1e-6, residual=r)              # no norm: the plain sum
                assert (y.float() - (x.float() + r.float())).abs().max() <= tol * 8
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h", [100, 768, 1024, 2560])
@pytest.mark.parametrize("sandwich", [False, True])
def test_kernel_matches_reference_on_gpu(dtype, h, sandwich, near_exact):
    x, r, xb, w, pw = _inputs(1000, h, dtype, "cuda", seed=h)
    kw = dict(post_weight=pw, post_eps=1e-5) if sandwich else {}
    res = r.clone()
    out = torch.full_like(x, float("nan"))
    y, s = add_rmsnorm(x, w, 1e-6, residual=res, x_bias=xb, return_sum=True, out=out, sum_out=res, **kw)
    yr, sr = add_rmsnorm_ref(x, w, 1e-6, residual=r, x_bias=xb, return_sum=True, **kw)
    ye, se = add_rmsnorm_ref(x.double(), w.double(), 1e-6, residual=r.double(), x_bias=xb.double(),
                             return_sum=True, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    near_exact(y, yr, ye)
    near_exact(s, sr, se)
