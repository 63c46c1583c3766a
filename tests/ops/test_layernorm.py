"""Fused (bias +) (residual +) LayerNorm: reference on CPU, Triton kernel under the interpreter and on GPU."""
import pytest
import torch
import torch.nn.functional as F

from packformer.ops.layernorm import add_layernorm, add_layernorm_ref


def _inputs(t, h, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    return mk(t, h, scale=3.0), mk(t, h), mk(h), mk(h, scale=0.5) + 1, mk(h)


def test_ref_is_layernorm_of_the_sum_of_its_inputs():
    x, r, xb, w, b = _inputs(5, 24, torch.float64)
    want = F.layer_norm(x + xb + r, (24,), w, b, 1e-5)
    assert torch.allclose(add_layernorm_ref(x, w, b, 1e-5, residual=r, x_bias=xb), want, atol=1e-6)
    assert torch.allclose(add_layernorm_ref(x, w, b, 1e-5), F.layer_norm(x, (24,), w, b, 1e-5), atol=1e-6)


def test_ref_returns_the_presum_for_prenorm_stacks():
    x, r, xb, w, b = _inputs(3, 16, torch.float32)
    y, s = add_layernorm_ref(x, w, b, 1e-5, residual=r, x_bias=xb, return_sum=True)
    assert torch.allclose(s, x + xb + r) and torch.allclose(y, F.layer_norm(s, (16,), w, b, 1e-5), atol=1e-5)


def test_ref_sums_in_fp32_for_half_inputs():
    x, r, xb, w, b = _inputs(4, 64, torch.bfloat16)
    exact = F.layer_norm(x.double() + xb.double() + r.double(), (64,), w.double(), b.double(), 1e-5)
    got = add_layernorm_ref(x, w, b, 1e-5, residual=r, x_bias=xb)
    assert got.dtype == torch.bfloat16
    assert (got.double() - exact).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * exact.abs().max()


def test_launcher_on_cpu_runs_the_reference_and_fills_out():
    x, r, xb, w, b = _inputs(6, 40, torch.float32)
    out = torch.full_like(x, float("nan"))
    y = add_layernorm(x, w, b, 1e-12, residual=r, x_bias=xb, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.allclose(y, add_layernorm_ref(x, w, b, 1e-12, residual=r, x_bias=xb))


@pytest.mark.parametrize("bad, msg", [
    (dict(residual=torch.zeros(6, 39)), "residual"),
    (dict(x_bias=torch.zeros(41)), "x_bias"),
    (dict(out=torch.zeros(6, 40, dtype=torch.float64)), "dtype"),
])
def test_launcher_names_the_bad_argument(bad, msg):
    x, _, _, w, b = _inputs(6, 40, torch.float32)
    with pytest.raises(ValueError, match=msg):
        add_layernorm(x, w, b, 1e-5, **bad)


def test_launcher_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        add_layernorm(torch.zeros(2, 3, 4), torch.ones(4), torch.zeros(4), 1e-5)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.layernorm import add_layernorm, add_layernorm_ref
        assert _triton.INTERPRET and _triton.kernel_ok(torch.zeros(1))
        g = torch.Generator().manual_seed(1)
        for dt in (torch.float16, torch.float32):
            for h in (48, 100):
                x, r = torch.randn(7, h, generator=g).to(dt) * 3, torch.randn(7, h, generator=g).to(dt)
                xb, w, b = (torch.randn(h, generator=g).to(dt) for _ in range(3))
                out = torch.full_like(x, float("nan"))
                y, s = add_layernorm(x, w, b, 1e-5, residual=r, x_bias=xb, return_sum=True, out=out)
                yr, sr = add_layernorm_ref(x, w, b, 1e-5, residual=r, x_bias=xb, return_sum=True)
                tol = 2e-3 if dt == torch.float16 else 1e-5
                assert y is out and torch.isfinite(y).all()
                assert (y.float() - yr.float()).abs().max() <= tol * 4, (dt, h)
                assert (s.float() - sr.float()).abs().max() <= tol * 4, (dt, h)
                x2 = x.clone()          # sum written in place over the input (pre-norm residual stream)
                add_layernorm(x2, w, b, 1e-5, x_bias=xb, return_sum=True, sum_out=x2)
                assert (x2.float() - (x.float() + xb.float())).abs().max() <= tol * 8
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h", [100, 384, 768, 1024])
def test_kernel_matches_reference_on_gpu(dtype, h, near_exact):
    x, r, xb, w, b = _inputs(1000, h, dtype, "cuda", seed=h)
    out = torch.full_like(x, float("nan"))
    y, s = add_layernorm(x, w, b, 1e-12, residual=r, x_bias=xb, return_sum=True, out=out)
    yr, sr = add_layernorm_ref(x, w, b, 1e-12, residual=r, x_bias=xb, return_sum=True)
    s_exact = x.double() + xb.double() + r.double()
    exact = F.layer_norm(s_exact, (h,), w.double(), b.double(), 1e-12)
    near_exact(y, yr, exact)
    near_exact(s, sr, s_exact)


@pytest.mark.gpu
def test_kernel_sum_may_overwrite_its_input_on_gpu():
    x, _, xb, w, b = _inputs(300, 768, torch.float16, "cuda")
    want_y, want_s = add_layernorm_ref(x, w, b, 1e-5, x_bias=xb, return_sum=True)
    y, s = add_layernorm(x, w, b, 1e-5, x_bias=xb, return_sum=True, sum_out=x)
    assert s.data_ptr() == x.data_ptr()
    assert (s.float() - want_s.float()).abs().max() <= 1e-2 and (y.float() - want_y.float()).abs().max() <= 1e-2
