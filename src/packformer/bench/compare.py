"""Output agreement: each peer's output against the fp32 reference, row by row."""
from __future__ import annotations

import torch

# The accuracy bar: fp32 within 1e-4 (max abs) of the reference; fp16/bf16 cosine >= 0.9995 per embedding.
# Per-token hidden states in half precision are noisier than pooled embeddings: 0.999 per token.
FP32_MAX_ABS = 1e-4
LOWP_MIN_COS_POOLED = 0.9995
LOWP_MIN_COS_TOKEN = 0.999
# int8 Linear layers (lossy by design, quantize="int8"): cosine >= 0.99 per embedding, 0.98 per token
INT8_MIN_COS_POOLED = 0.99
INT8_MIN_COS_TOKEN = 0.98


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, per: str, int8: bool = False,
            quantized: str = "int8") -> dict:
    """out, ref: [N, D] fp32 CPU (N tokens or sequences). `per` names the rows ("token" / "sequence");
    int8: the peer quantizes its Linear layers (to `quantized`: int8, fp8), judged by cosine like half
    precision but looser."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} does not match the reference {tuple(ref.shape)}")
    out, ref = out.float(), ref.float()
    diff = (out - ref).abs()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1) if out.numel() else torch.ones(0)
    d = {"rows": per, "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
         "mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0,
         "min_cosine": float(cos.min()) if cos.numel() else 1.0}
    if int8:
        t = INT8_MIN_COS_TOKEN if per == "token" else INT8_MIN_COS_POOLED
        d["criterion"] = f"min_cosine >= {t} ({quantized})"
        d["agrees"] = d["min_cosine"] >= t
    elif dtype == torch.float32:
        d["criterion"] = f"max_abs_diff <= {FP32_MAX_ABS}"
        d["agrees"] = d["max_abs_diff"] <= FP32_MAX_ABS
    else:
        t = LOWP_MIN_COS_TOKEN if per == "token" else LOWP_MIN_COS_POOLED
        d["criterion"] = f"min_cosine >= {t}"
        d["agrees"] = d["min_cosine"] >= t
    return d
