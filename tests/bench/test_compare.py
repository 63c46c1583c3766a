"""Agreement thresholds: fp32 within 1e-4 (max abs) of the reference; half precision and int8 by cosine."""
import pytest
import torch

from packformer.bench.compare import compare


def _ref(rows=6, dim=8, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def _with_cosine(ref, row, cosine, seed=1):
    """A copy of `ref` whose row `row` is turned, at the same length, to the given cosine with the
    original (built in float64 from a vector orthogonal to it); the other rows are unchanged."""
    r = ref[row].double()
    u = torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u -= u.dot(r) / r.dot(r) * r
    out = ref.clone()
    out[row] = (r.norm() * (cosine * r / r.norm() + (1 - cosine ** 2) ** 0.5 * u / u.norm())).float()
    return out


def test_fp32_agreement_is_max_abs_diff_of_at_most_1e_4():
    ref = _ref()
    for delta, agrees in ((0.99e-4, True), (1.01e-4, False)):
        out = ref.clone()
        out[2, 5] += delta                                  # one element is enough either way
        d = compare(out, ref, torch.float32, "token")
        assert d["agrees"] is agrees and d["max_abs_diff"] == pytest.approx(delta, rel=1e-3)
        assert d["rows"] == "token" and d["criterion"] == "max_abs_diff <= 0.0001"
    # a direction-preserving error is still an error in fp32
    assert not compare(ref * 1.001, ref, torch.float32, "sequence")["agrees"]


@pytest.mark.parametrize("dtype, per, int8, bound", [
    (torch.float16, "sequence", False, 0.9995),
    (torch.bfloat16, "sequence", False, 0.9995),
    (torch.float16, "token", False, 0.999),           # per-token hidden states are noisier than embeddings
    (torch.float32, "sequence", True, 0.99),          # int8 Linear layers: looser still
    (torch.float32, "token", True, 0.98),
])
def test_cosine_agreement_is_the_minimum_over_rows(dtype, per, int8, bound):
    ref = _ref()
    margin = (1 - bound) / 20
    for cosine, agrees in ((bound + margin, True), (bound - margin, False)):
        out = _with_cosine(ref, 3, cosine)                 # one row off, five exact
        d = compare(out, ref, dtype, per, int8=int8)
        assert d["agrees"] is agrees and d["min_cosine"] == pytest.approx(cosine, abs=1e-6)
        assert str(bound) in d["criterion"] and ("int8" in d["criterion"]) is int8


def test_half_precision_ignores_the_length_of_a_row():
    ref = _ref()
    d = compare(ref * 1.5, ref, torch.float16, "sequence")
    assert d["agrees"] and d["max_abs_diff"] > 0.1
    d = compare(-ref, ref, torch.bfloat16, "sequence")
    assert not d["agrees"] and d["min_cosine"] == pytest.approx(-1.0, abs=1e-6)


def test_int8_is_judged_by_its_own_bound_whatever_the_dtype():
    ref = _ref()
    out = _with_cosine(ref, 0, 0.995)
    assert not compare(out, ref, torch.float16, "sequence")["agrees"]
    assert compare(out, ref, torch.float16, "sequence", int8=True)["agrees"]
    assert compare(out, ref, torch.float32, "sequence", int8=True)["agrees"]


def test_empty_outputs_agree():
    d = compare(torch.zeros(0, 8), torch.zeros(0, 8), torch.float32, "token")
    assert d["agrees"] and d["max_abs_diff"] == 0.0 and d["min_cosine"] == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        compare(torch.zeros(2, 3), torch.zeros(3, 3), torch.float32, "token")


def test_fp8_is_judged_as_a_quantized_peer_and_named_so():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 16, generator=g)
    d = compare(ref + 0.05 * torch.randn(8, 16, generator=g), ref, torch.float16, "sequence", int8=True,
                quantized="fp8")
    assert d["criterion"].endswith("(fp8)") and d["agrees"]

