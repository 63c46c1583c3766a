"""fp8 (e4m3) quantization and GEMMs: the torch reference on CPU, the Triton kernels under the interpreter
(fp16: the interpreter's own bf16 rounding drops the exponent carry) and on an fp8 GPU."""
import pytest
import torch

from packformer.ops.layernorm import add_layernorm
from packformer.ops.fp8 import (E4M3, E4M3_MAX, LARGE, RES, SMALL, WIDE, Quantized, TileConfig, default_config,
                                fp8_linear, fp8_linear_ref, quantize_rows, quantize_rows_ref, quantize_weight)

needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA GPU with fp8 tensor cores (sm89+)")


def _x(t, k, dtype=torch.float16, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g) * scale).to(dtype)


def test_rows_are_scaled_to_the_e4m3_range_and_rounded_to_its_grid():
    x = _x(9, 40, torch.float32)
    x[3] *= 1000                                            # a row's scale is its own, not its batch's
    qx = quantize_rows_ref(x)
    assert qx.q.dtype == E4M3 and qx.scale.shape == (9,)
    assert torch.allclose(qx.scale, x.abs().amax(1) / E4M3_MAX)
    assert (qx.q.float().abs().amax(1) == E4M3_MAX).all()    # each row's largest element maps to 448
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most half a step, 2^-4 of its size
    err = (qx.dequantize() - x).abs()
    assert (err <= x.abs() * 2 ** -4 + qx.scale[:, None] * 2 ** -10).all()
    assert torch.equal(quantize_rows_ref(x[3:4]).q, qx.q[3:4])


def test_a_zero_row_quantizes_to_zeros_with_a_finite_scale():
    qx = quantize_rows_ref(torch.zeros(2, 16))
    assert (qx.q.float() == 0).all() and torch.isfinite(qx.scale).all() and (qx.scale > 0).all()


def test_bias_and_activation_come_before_the_quantization():
    x, b = _x(5, 32), _x(1, 32, seed=1)[0]
    qx = quantize_rows_ref(x, b, "gelu", keep=True)
    assert torch.equal(qx.x, torch.nn.functional.gelu(x.float() + b.float()).half())
    assert torch.equal(qx.q, quantize_rows_ref(qx.x).q)


def test_glu_rows_are_the_gated_product_of_the_two_halves():
    x = _x(5, 64)
    qx = quantize_rows_ref(x, act="silu", keep=True, glu=True)
    gate, up = x.float().chunk(2, dim=-1)
    assert qx.q.shape == (5, 32) and torch.equal(qx.x, (torch.nn.functional.silu(gate) * up).half())
    with pytest.raises(ValueError, match="glu"):
        quantize_rows(x, glu=True)


def test_weights_get_one_scale_per_output_channel():
    w = _x(24, 16, torch.float32)
    q, s = quantize_weight(w)
    assert q.shape == (24, 16) and q.dtype == E4M3 and s.shape == (24,)
    assert torch.allclose(s, w.abs().amax(1) / E4M3_MAX)


def test_reference_gemm_is_the_dequantized_product_with_its_epilogue():
    x, w, b, r = _x(7, 32), _x(12, 32, torch.float32), _x(1, 12, seed=2)[0], _x(7, 12, seed=3)
    a, (wq, ws) = quantize_rows_ref(x), quantize_weight(w)
    want = a.dequantize() @ (wq.float() * ws[:, None]).t()
    assert torch.allclose(fp8_linear_ref(a, wq, ws).float(), want, rtol=1e-3, atol=1e-3)
    got = fp8_linear_ref(a, wq, ws, bias=b, act="relu", residual=r)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), (torch.relu(want + b.float()) + r.float()).half().float())


def test_launcher_on_cpu_runs_the_reference_and_updates_the_residual_in_place():
    x, w, r = _x(6, 32), _x(8, 32, torch.float32), _x(6, 8, seed=4)
    a, (wq, ws) = quantize_rows(x), quantize_weight(w)
    want = fp8_linear_ref(a, wq, ws, residual=r)
    res = r.clone()
    got = fp8_linear(a, wq, ws, residual=res)
    assert got.data_ptr() == res.data_ptr() and torch.equal(got, want)
    assert fp8_linear(a, wq, ws, out_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("change, msg", [
    (dict(wq=torch.zeros(8, 24, dtype=E4M3)), r"\[N, K=32\]"),
    (dict(wq=torch.zeros(8, 32)), "float8_e4m3fn"),
    (dict(ws=torch.ones(7)), "weight scales"),
    (dict(bias=torch.zeros(9)), "bias"),
    (dict(residual=torch.zeros(6, 9, dtype=torch.float16)), "residual"),
    (dict(act="swish"), "activation"),
    (dict(out_dtype=torch.float32), "fp16 or bf16"),
    (dict(backend="cublas"), "backend"),
])
def test_launcher_names_the_bad_argument(change, msg):
    a = quantize_rows(_x(6, 32))
    wq, ws = quantize_weight(_x(8, 32, torch.float32))
    kw = dict(wq=wq, ws=ws)
    kw.update(change)
    with pytest.raises(ValueError, match=msg):
        fp8_linear(a, **kw)


def test_unquantized_activations_are_refused():
    wq, ws = quantize_weight(_x(8, 32, torch.float32))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(Quantized(_x(6, 32), torch.ones(6)), wq, ws)


def test_residual_gemms_take_square_tiles_unless_the_batch_is_a_few_hundred_tokens():
    # out-projection and FFN2: 128 x 128 x 4 stages (a 128 x 256 residual tile leaves room for 2 stages only)
    assert default_config(2209, 768, 3072, residual=True) == RES
    assert default_config(35201, 1024, 1024, residual=True) == RES
    assert default_config(521, 768, 768, residual=True) == SMALL        # 30 tiles: too few for 132 SMs
    assert default_config(35201, 3072, 768) == LARGE and default_config(35201, 768, 768) == WIDE


def test_kernels_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops.fp8 import *
        from packformer.ops.layernorm import add_layernorm
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(37, 96, generator=g) * 3).half()
        b = torch.randn(96, generator=g).half()
        for bias, act in ((None, None), (b, "relu"), (b, None)):
            got, want = quantize_rows(x, bias, act, keep=True), quantize_rows_ref(x, bias, act, keep=True)
            assert torch.equal(got.x, want.x), (bias is None, act)
            assert torch.equal(got.q.float(), want.q.float()), (bias is None, act)
            assert torch.equal(got.scale, want.scale)
        # GELU: the kernel's erf may round a row to the next fp16 value; its codes follow its own rows
        # (codes compared as values: a tiny negative rounds to +0 here, -0 in torch)
        got = quantize_rows(x, b, "gelu", keep=True)
        assert torch.equal(got.q.float(), quantize_rows_ref(got.x).q.float())
        # GLU: [T, 2F] -> [T, F]
        got, want = quantize_rows(x, act="relu", keep=True, glu=True), quantize_rows_ref(x, act="relu", keep=True, glu=True)
        assert torch.equal(got.x, want.x) and torch.equal(got.q.float(), want.q.float())
        # the fused norms' codes are their own outputs'
        from packformer.ops.rmsnorm import add_rmsnorm
        w = torch.randn(96, generator=g).half()
        y = add_layernorm(x, w, b, 1e-5, quantize=True)
        assert torch.equal(y.q.float(), quantize_rows_ref(y.x).q.float())
        assert torch.equal(y.scale, quantize_rows_ref(y.x).scale)
        y, s = add_rmsnorm(x, w, 1e-6, residual=x.flip(0).contiguous(), return_sum=True, quantize=True)
        assert torch.equal(y.q.float(), quantize_rows_ref(y.x).q.float()) and s.shape == x.shape
        # the TMA GEMM: tail tiles in M and N, bias + activation + in-place residual
        a = quantize_rows(x)
        wq, ws = quantize_weight(torch.randn(72, 96, generator=g))
        bias, res = torch.randn(72, generator=g).half(), torch.randn(37, 72, generator=g).half()
        cases = [(TileConfig(32, 32, 32, 2, 4, 2), kw)
                 for kw in (dict(), dict(bias=bias, act="gelu"), dict(bias=bias, residual=res))]
        cases.append((RES, dict(residual=res)))        # the residual GEMMs' tiles: one tile past both ends
        for cfg, kw in cases:
            want = fp8_linear_ref(a, wq, ws, **kw)
            r0 = kw["residual"].clone() if "residual" in kw else None
            got = fp8_linear(a, wq, ws, config=cfg, backend="triton", **kw)
            if r0 is not None:
                assert got.data_ptr() == res.data_ptr()
            err = (got.float() - want.float()).abs().max().item()
            assert err <= 2e-3 * want.float().abs().max().item(), (kw.keys(), err)
            if r0 is not None:
                res.copy_(r0)
        print("ok")
    """)


@needs_fp8_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_match_the_reference_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 768, generator=g) * 3).to("cuda", dtype)
    b = torch.randn(768, generator=g).to("cuda", dtype)
    got, want = quantize_rows(x), quantize_rows_ref(x)
    assert torch.equal(got.q.float(), want.q.float()) and torch.equal(got.scale, want.scale)
    # bias + GELU: the kernel's erf differs from torch's in the far negative tail (|GELU| < 1e-5), which
    # may round a row differently; its codes are exactly those of its own rows
    got, want = quantize_rows(x, b, "gelu", keep=True), quantize_rows_ref(x, b, "gelu", keep=True)
    assert (got.x.float() - want.x.float()).abs().max() <= 1e-5 + 2 * torch.finfo(dtype).eps * x.abs().max()
    own = quantize_rows_ref(got.x)
    assert torch.equal(got.q.float(), own.q.float()) and torch.equal(got.scale, own.scale)
    y = add_layernorm(x, torch.randn(768, generator=g).to("cuda", dtype), b, 1e-5, quantize=True)
    assert torch.equal(y.q.float(), quantize_rows_ref(y.x).q.float())
    wq, ws = quantize_weight(torch.randn(3072, 768, generator=g).cuda())
    a = quantize_rows(x)
    res = torch.randn(1000, 3072, generator=g).to("cuda", dtype)
    for backend in ("triton", "scaled_mm"):
        if backend == "triton" and torch.cuda.get_device_capability()[0] < 9:
            continue
        for kw in (dict(), dict(bias=torch.randn(3072, generator=g).to("cuda", dtype), act="gelu"),
                   dict(residual=res)):
            want = fp8_linear_ref(a, wq, ws, out_dtype=dtype, **kw).float()
            r0 = res.clone()
            got = fp8_linear(a, wq, ws, out_dtype=dtype, backend=backend, **kw).float()
            res.copy_(r0)
            # fp32 sums in another order may round an output to the neighbouring fp16 / bf16 value (2 ulps at
            # the largest); _scaled_mm also rounds to bf16 before the epilogue
            big = want.abs().max().item()
            tol = (2e-2 if backend == "scaled_mm" else 2e-3) * big + 2 * torch.finfo(dtype).eps * big
            assert (got - want).abs().max().item() <= tol, (backend, kw.keys())
