"""Fused bias + activation after FFN1: reference on CPU, Triton kernel under the interpreter and on GPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from packformer.ops.gelu import bias_act, bias_act_ref


def _exact(x, b, act):
    y = x.double() + b.double()
    if act == "gelu":
        return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    if act == "gelu_tanh":
        return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    return y.clamp(min=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_ref_is_the_activation_of_the_biased_input(act):
    x, b = torch.randn(4, 33, dtype=torch.float64) * 3, torch.randn(33, dtype=torch.float64)
    assert torch.allclose(bias_act_ref(x, b, act), _exact(x, b, act), atol=1e-7)


def test_ref_without_bias_and_erf_gelu_is_not_the_tanh_one():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)[None]
    assert torch.allclose(bias_act_ref(x, None, "gelu"), F.gelu(x))
    assert not torch.allclose(bias_act_ref(x, None, "gelu"), bias_act_ref(x, None, "gelu_tanh"), atol=1e-6)


def test_launcher_rejects_unknown_activation_and_bad_bias():
    with pytest.raises(ValueError, match="activation"):
        bias_act(torch.zeros(2, 4), None, "swish")
    with pytest.raises(ValueError, match="bias"):
        bias_act(torch.zeros(2, 4), torch.zeros(5), "gelu")


def test_launcher_on_cpu_runs_the_reference_in_place():
    x, b = torch.randn(3, 20), torch.randn(20)
    want = bias_act_ref(x, b, "gelu")
    y = bias_act(x, b, "gelu", out=x)
    assert y.data_ptr() == x.data_ptr() and torch.allclose(y, want)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops.gelu import bias_act, bias_act_ref
        g = torch.Generator().manual_seed(0)
        for act in ("gelu", "gelu_tanh", "relu"):
            for dt in (torch.float16, torch.float32):
                x, b = (torch.randn(5, 1100, generator=g) * 3).to(dt), torch.randn(1100, generator=g).to(dt)
                out = torch.full_like(x, float("nan"))
                y = bias_act(x, b, act, out=out)
                tol = 4e-3 if dt == torch.float16 else 1e-5
                assert y is out and torch.isfinite(y).all()
                err = (y.float() - bias_act_ref(x, b, act).float()).abs().max().item()
                assert err <= tol * 10, (act, dt, err)
                # rows with a stride (a view into a wider buffer) take the row-per-program kernel
                wide = torch.full((5, 1300), float("nan"), dtype=dt)
                y2 = bias_act(x, b, act, out=wide[:, :1100])
                assert torch.equal(y2, y) and wide[:, 1100:].isnan().all()
        # the kernel's own erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): over the whole range, fp32
        # erf-GELU 0.5 x (1 + erf(x / sqrt 2)) is within 0.5 |x| (1.5e-7 + 2 eps) of the exact value (the
        # approximation, plus the rounding of erf and of 1 + erf) and 2 eps |y| (the last products)
        x = torch.linspace(-12, 12, 24001)[None]
        exact = 0.5 * x.double() * (1 + torch.erf(x.double() / 2 ** 0.5))
        err = (bias_act(x, None, "gelu").double() - exact).abs()
        eps = torch.finfo(torch.float32).eps
        assert (err <= 0.5 * x.abs() * (1.5e-7 + 2 * eps) + 2 * eps * exact.abs()).all(), err.max().item()
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("n", [1536, 3072, 4096, 1000])
def test_kernel_matches_reference_on_gpu(dtype, act, n, near_exact):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(777, n, generator=g) * 3).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype)
    out = torch.full_like(x, float("nan"))
    near_exact(bias_act(x, b, act, out=out), bias_act_ref(x, b, act), _exact(x, b, act))
