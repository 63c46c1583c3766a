"""Gated FFN activation act(gate) * up: reference on CPU, Triton kernel under the interpreter and on GPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from packformer.ops.glu import glu, glu_ref


def _exact(x, act):
    g, u = x.double().chunk(2, dim=-1)
    if act == "gelu":
        a = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    elif act == "silu":
        a = g / (1 + torch.exp(-g))
    else:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    return a * u


@pytest.mark.parametrize("act", ["gelu", "silu", "gelu_tanh"])
def test_ref_is_the_activated_gate_times_up(act):
    x = torch.randn(4, 2 * 33, dtype=torch.float64) * 3
    assert torch.allclose(glu_ref(x, act), _exact(x, act), atol=1e-7)


def test_gate_is_the_first_half():
    x = torch.tensor([[-10.0, 2.0, 3.0, 5.0]])               # gate [-10, 2], up [3, 5]
    assert torch.allclose(glu_ref(x, "silu"), torch.stack([F.silu(torch.tensor(-10.0)) * 3, F.silu(torch.tensor(2.0)) * 5])[None])


def test_launcher_rejects_odd_widths_unknown_activations_and_bad_out():
    with pytest.raises(ValueError, match=r"\[T, 2F\]"):
        glu(torch.zeros(2, 5), "gelu")
    with pytest.raises(ValueError, match="activation"):
        glu(torch.zeros(2, 4), "swish")
    with pytest.raises(ValueError, match="out must be"):
        glu(torch.zeros(2, 4), "gelu", out=torch.zeros(2, 4))


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops.glu import glu, glu_ref
        g = torch.Generator().manual_seed(0)
        for act in ("gelu", "silu", "gelu_tanh", "relu"):
            for dt in (torch.float16, torch.float32):
                x = (torch.randn(9, 2 * 1030, generator=g) * 6).to(dt)     # |x| up to ~30: no overflow allowed
                out = torch.full((9, 1030), float("nan"), dtype=dt)
                y = glu(x, act, out=out)
                assert y is out and torch.isfinite(y).all()
                ref = glu_ref(x, act).float()
                err = ((y.float() - ref).abs() / (1 + ref.abs())).max().item()
                assert err <= (4e-3 if dt == torch.float16 else 1e-5), (act, dt, err)
        print("ok")
    """)


@pytest.mark.gpu
def test_kernel_on_gpu_is_as_close_as_the_reference(near_exact):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for act in ("gelu", "silu"):
        for dt in (torch.float16, torch.bfloat16):
            x = (torch.randn(4099, 2 * 1152, device="cuda") * 3).to(dt)
            near_exact(glu(x, act), glu_ref(x, act), _exact(x.cpu(), act).to(x.device))
