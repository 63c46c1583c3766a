"""Agreement thresholds: fp32 within 1e-4 (max abs) of the reference; half precision and int8 by cosine."""
import pytest
import torch

from packformer.bench.compare import compare


def test_fp32_agreement_is_max_abs_diff():
    ref = torch.randn(6, 8)
    assert compare(ref + 5e-5, ref, torch.float32, "token")["agrees"]
    d = compare(ref + 2e-4, ref, torch.float32, "token")
    assert not d["agrees"] and d["max_abs_diff"] == pytest.approx(2e-4, rel=1e-2) and d["rows"] == "token"


def test_half_precision_agreement_is_cosine_per_row():
    ref = torch.randn(6, 8)
    noisy = ref.clone()
    noisy[3] = -noisy[3]
    assert compare(ref * 1.01, ref, torch.float16, "sequence")["agrees"]
    d = compare(noisy, ref, torch.bfloat16, "sequence")
    assert not d["agrees"] and d["min_cosine"] == pytest.approx(-1.0, abs=1e-5)


def test_int8_agreement_is_a_looser_cosine_than_half_precision():
    ref = torch.randn(200, 64)
    noisy = ref + 0.08 * ref.norm(dim=1, keepdim=True) / 8 * torch.randn(200, 64)   # cosine ~0.995
    assert not compare(noisy, ref, torch.float32, "sequence")["agrees"]            # fp32 would be max abs
    assert not compare(noisy, ref, torch.float16, "sequence")["agrees"]            # and 0.9995 for fp16
    d = compare(noisy, ref, torch.float32, "sequence", int8=True)
    assert d["agrees"] and "int8" in d["criterion"] and 0.99 <= d["min_cosine"] < 0.9995
    assert not compare(ref + 0.5 * torch.randn(200, 64) * ref.norm(dim=1, keepdim=True) / 8, ref,
                       torch.float32, "sequence", int8=True)["agrees"]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        compare(torch.zeros(2, 3), torch.zeros(3, 3), torch.float32, "token")
