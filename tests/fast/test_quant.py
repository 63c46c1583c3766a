"""The int8 mode (`quantize="int8"`): per-row activation scales, so a text's embedding does not depend
on its batch; cosine >= 0.99 with fp32 for every embedding on all-MiniLM-L6-v2; classification labels
kept; and the oneDNN kernel computes exactly the quantization written out in plain torch."""
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import packformer
from packformer.bench.workloads import generate_texts
from packformer.fast.cpu_linear import act_
from packformer.fast.quant import (BLOCK_ROWS, DynamicInt8Linear, calibrate_outliers, int8_linear_ref,
                                   int8_weight_qmax, quantize_rows, quantize_rows_ref)

SHORT = ["x", "yes .", "I !", "ok", "Hello world", "How are you!", "中", "😀 Berlin", "no ?", "42"]
LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods. "


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def int8_minilm(minilm_dir):
    return packformer.load(minilm_dir, quantize="int8")


@pytest.fixture(scope="module")
def varied_texts():
    # short texts (where quantization error shows most), generator texts, and long ones (> BLOCK_ROWS tokens
    # in the batch, so the kernel's row blocks split sequences)
    return SHORT + generate_texts(150) + [LONG * 4, LONG * 10]


# ---- (1) a result never depends on what else shares its batch -----------------------------------

def test_an_int8_embedding_alone_equals_the_same_text_inside_a_large_mixed_batch(int8_minilm, varied_texts):
    batch = varied_texts + SHORT[::-1]
    assert sum(len(x) for x in int8_minilm.tokenizer.encode_raw(batch)) > 3 * BLOCK_ROWS
    together = int8_minilm.encode(batch, batch_size=len(batch))
    for text in SHORT + [LONG * 4]:
        alone = int8_minilm.encode([text])[0]
        np.testing.assert_array_equal(together[batch.index(text)], alone, err_msg=text)


def test_an_int8_linear_row_does_not_depend_on_the_other_rows():
    # one row of huge activations next to ordinary rows: a per-tensor scale would crush the ordinary ones
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(BLOCK_ROWS + 37, 64, generator=g)
    x[3] *= 1e4
    q = DynamicInt8Linear(lin)
    with torch.inference_mode():
        together = q(x)
        alone = torch.cat([q(x[i:i + 1]) for i in range(0, x.shape[0], 50)] + [q(x[i:i + 1]) for i in (3, 4)])
        rows = torch.cat([together[i:i + 1] for i in range(0, x.shape[0], 50)] + [together[i:i + 1] for i in (3, 4)])
    assert torch.equal(alone, rows)


# ---- (2) accuracy vs fp32 on the real model --------------------------------------------------------

def test_int8_keeps_cosine_099_with_fp32_for_every_embedding(minilm, int8_minilm, varied_texts):
    assert int8_minilm.runner.linear_backend == "DynamicInt8Linear"
    got = int8_minilm.encode(varied_texts)
    assert np.isfinite(got).all()
    cos = _cos(got, minilm.encode(varied_texts))
    assert cos.min() >= 0.99, [(varied_texts[i][:30], float(cos[i])) for i in np.argsort(cos)[:5]]
    assert cos.mean() >= 0.998


def test_outlier_channels_are_found_on_the_model_not_the_batch(minilm_dir):
    # all-MiniLM-L6-v2 carries a few huge residual-stream channels (99, 157, 223, 338 ...) in every token;
    # the calibration finds them from random ids, the same every time
    encoder = packformer.load(minilm_dir, fast=False).encoder
    a, b = calibrate_outliers(encoder), calibrate_outliers(encoder)
    qkv = encoder.layers[3].qkv
    assert torch.equal(a[qkv], b[qkv]) and a[qkv].numel() == 8
    assert {99, 157, 338} <= set(a[qkv].tolist())


# ---- (3) classification ---------------------------------------------------------------------------

def test_int8_keeps_classification_labels(minilm_dir):
    from packformer.engine import Model
    from packformer.heads import ClassificationHead
    from packformer.loading import load_parts

    def with_head(**kw):
        parts = load_parts(minilm_dir)
        torch.manual_seed(0)
        parts.head = ClassificationHead(384, 4)
        parts.config = parts.config.replace(num_labels=4)
        return Model(parts, **kw)

    texts = generate_texts(200) + SHORT
    fp32, int8 = with_head().classify(texts), with_head(quantize="int8").classify(texts)
    assert np.abs(fp32 - int8).max() <= 0.05
    top2 = np.sort(fp32, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05          # labels that a 0.05 logit error cannot flip
    assert clear.mean() >= 0.5
    assert (fp32.argmax(1) == int8.argmax(1))[clear].all()
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.97


# ---- (4) the kernel computes the quantization of the plain-torch reference ------------------------

def _rows(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 10
    x[0] = 0                       # an all-zero row: scale clamps, output is the bias
    if n > 2:
        x[1] *= 1e-6               # tiny values
        x[2, 5] = 1e3              # one outlier in a row
    return x


@pytest.mark.parametrize("n", [1, 7, BLOCK_ROWS, BLOCK_ROWS + 1, 2 * BLOCK_ROWS + 77])
def test_row_quantization_matches_the_reference_except_at_rounding_ties(n):
    x = _rows(n, 96)
    u, s = quantize_rows(x)
    q, s_ref = quantize_rows_ref(x)
    assert u.dtype == torch.uint8 and s.shape == (n, 1)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    d = u.int() - 128 - q.int()
    # x * (127 / amax) vs x / (amax / 127): the two roundings disagree only next to a .5 boundary
    assert d.abs().max() <= 1 and (d != 0).float().mean() <= 1e-3


@pytest.mark.parametrize("qmax", [None, 63], ids=["this CPU's weight range", "7-bit weights"])
@pytest.mark.parametrize("outliers", [None, [5, 17, 40]], ids=["no outliers", "3 fp32 channels"])
@pytest.mark.parametrize("mode", [None, "gelu", "relu", "residual"])
@pytest.mark.parametrize("n", [3, BLOCK_ROWS + 5])
def test_the_int8_linear_matches_the_plain_torch_quantization(n, mode, outliers, qmax):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 48)
    x = _rows(n, 96, seed=2)
    r = torch.randn(n, 48, generator=g)
    out_idx = None if outliers is None else torch.tensor(outliers)
    q = DynamicInt8Linear(lin, out_idx, weight_qmax=qmax)
    with torch.inference_mode():
        ref = int8_linear_ref(x, lin.weight, lin.bias, out_idx, weight_qmax=q.weight_qmax)
        if mode == "residual":
            got, want = q(x, residual=r), ref + r
        else:
            got, want = q(x, act=mode), act_(ref, mode)
    # same integers; where a rounding tie went the other way, one LSB of x times |w| at most
    lsb = (x.abs().amax(1, keepdim=True) / 127) * lin.weight.abs().amax() * 1.01
    assert ((got - want).abs() <= 1e-5 * (1 + want.abs()) + lsb).all()
    # ... which is rare: most outputs agree to float rounding
    assert ((got - want).abs() <= 1e-5 * (1 + want.abs())).float().mean() >= 0.95


def _saturating_case(qmax, n=700):
    """Weights at +-qmax and rows at +-max|x|: where u8 x s8 pair sums in int16 would saturate first."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.sign(torch.randn(16, 64, generator=g)))
        lin.weight[0], lin.weight[1] = 1.0, -1.0
    x = torch.sign(torch.randn(n, 64, generator=g)) * 3
    x[0::3], x[1::3] = 3.0, -3.0
    return lin, x


def _float_rounding_gap(got, want):
    """How far past float rounding got lies from want (<= 0 when within it).

    Outputs here reach |192|, where one fp32 ulp is 2**-16; a lost integer from a saturated
    int16 sum moves an output by a whole quantization step (>= 1.8e-4), far above 4 ulps."""
    tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * want.abs()
    return ((got - want).abs() - tol).max().item()


def test_the_weight_range_is_the_widest_the_kernel_runs_exactly():
    # 127 where int8 products are summed in int32 (VNNI, AMX), 63 where pairs go through int16 first
    qmax = int8_weight_qmax()
    assert qmax in (127, 63)
    lin, x = _saturating_case(qmax)
    q = DynamicInt8Linear(lin)
    assert q.weight_qmax == qmax and q.weight_int8.abs().max() == qmax
    with torch.inference_mode():
        assert _float_rounding_gap(q(x), int8_linear_ref(x, lin.weight, lin.bias, weight_qmax=qmax)) <= 0


def test_a_weight_range_the_kernel_cannot_run_exactly_is_refused():
    with pytest.raises(ValueError, match=rf"exact only for weights in \[-{int8_weight_qmax()}, "):
        DynamicInt8Linear(torch.nn.Linear(16, 8), weight_qmax=int8_weight_qmax() + 1)


def test_without_vnni_the_weights_take_7_bits_and_stay_exact():
    # every x86-64 CPU runs oneDNN's AVX2 kernels (u8 x s8 pairs summed in int16) under this cap
    code = inspect.getsource(_saturating_case) + inspect.getsource(_float_rounding_gap) + textwrap.dedent("""
        from packformer.fast.quant import DynamicInt8Linear, int8_linear_ref, int8_weight_qmax
        lin, x = _saturating_case(63)
        q = DynamicInt8Linear(lin)
        with torch.inference_mode():
            gap = _float_rounding_gap(q(x), int8_linear_ref(x, lin.weight, lin.bias, weight_qmax=63))
        print(int8_weight_qmax(), q.weight_qmax, gap)
    """)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    r = subprocess.run([sys.executable, "-c", "import torch\n" + code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    qmax, used, gap = r.stdout.split()
    assert (qmax, used) == ("63", "63") and float(gap) <= 0


def test_an_int8_linear_writes_into_a_given_output_block():
    lin = torch.nn.Linear(32, 16)
    x = _rows(40, 32)
    q = DynamicInt8Linear(lin)
    buf = torch.full((50, 16), float("nan"))
    with torch.inference_mode():
        y = q(x, out=buf[5:45])
    assert y.data_ptr() == buf[5].data_ptr() and buf[:5].isnan().all() and buf[45:].isnan().all()
    assert torch.equal(y, q(x))


def test_int8_tracks_the_fp32_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    x = torch.randn(33, 96, generator=g)
    with torch.inference_mode():
        got, want = DynamicInt8Linear(lin)(x), lin(x)
    assert F.cosine_similarity(got, want, dim=1).min() >= 0.999


def test_int8_loads_a_model_with_fewer_positions_than_the_calibration_lengths():
    """Calibration sequences are cut to the model's own maximum (here 64 positions)."""
    from packformer.engine import Model
    from packformer.fast import quant
    from packformer.loading import random_parts

    parts = random_parts("minilm-l6")
    small = parts.config.replace(max_position_embeddings=64)
    assert small.max_tokens_per_sequence < max(quant.CALIBRATION_LENGTHS)
    parts.config = parts.encoder.config = small
    parts.max_seq_length = 64
    parts.encoder.embeddings.position.weight.data = parts.encoder.embeddings.position.weight.data[:64].clone()
    m = Model(parts, device="cpu", quantize="int8")
    assert m.encode(["a short text"]).shape == (1, 384)
