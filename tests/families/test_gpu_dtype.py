"""The dtype a model gets on CUDA when load() is given none: the family's `gpu_dtype` (bf16 for the decoder
families Qwen3 and Gemma 3, fp16 for the encoders), decided from the config alone: no GPU needed."""
import pytest
import torch

from packformer.config import preset
from packformer.families import FAMILIES, model_dtype

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("name, want", [("qwen3-embedding-0.6b", torch.bfloat16), ("embeddinggemma-300m", torch.bfloat16),
                                        ("minilm-l6", torch.float16), ("modernbert-base", torch.float16),
                                        ("deberta-v3-base", torch.float16), ("xlmr-base", torch.float16)])
def test_cuda_default_is_the_familys_gpu_dtype(name, want):
    cfg = preset(name)
    assert model_dtype(cfg, CUDA) == want
    assert model_dtype(cfg, CPU) == torch.float32                 # CPU: fp32 for every family


def test_only_the_decoder_families_state_bf16():
    assert {f.name for f in FAMILIES.values() if f.gpu_dtype == "bfloat16"} == {"qwen3", "gemma3"}
    assert all(f.gpu_dtype in ("float16", "bfloat16") for f in FAMILIES.values())


def test_an_explicit_dtype_wins_and_is_checked():
    cfg = preset("qwen3-embedding-0.6b")
    assert model_dtype(cfg, CUDA, "float16") == torch.float16
    assert model_dtype(cfg, CUDA, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        model_dtype(cfg, CPU, "fp16")
    with pytest.raises(ValueError, match="unsupported dtype 'int4'"):
        model_dtype(cfg, CUDA, "int4")


def test_a_config_of_no_known_family_gets_fp16_on_cuda():
    assert model_dtype(preset("minilm-l6").replace(family="not-a-family"), CUDA) == torch.float16

