"""Profiles by kernel category: every profiler event falls in one documented category, each counted
once, and the GEMM floor profiles as a peer with GEMMs only."""
import re
import types
from pathlib import Path

import pytest
import torch

import packformer
from packformer.bench.profile import (CATEGORIES, FLOOR, TRITON_KERNELS, breakdown_of, kernel_category,
                                      run_profile, run_without_graphs)

# kernel names as the profiler reports them (cuBLAS / cuDNN / aten ones recorded on an H100 / H200; the
# nvjet_sm90_qq* one is torch._scaled_mm's on an H200 with torch 2.11 / CUDA 13)
NAMES = {
    "gemm": [
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
        "__5x_cublas",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNT",
        "nvjet_sm90_hsh_192x192_64x4_1x2_h_bz_coopB_bias_TNN",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half, false, float",
        "void cutlass::Kernel2<cutlass_75_tensorop_f16_s1688gemm_f16_128x128_tn_align1>"
        "(cutlass_75_tensorop_f16_s1688gemm_f16_128x128_tn_align1::Params)",
        "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn",
        "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear", "mkldnn::_linear_pointwise",
        "onednn::qlinear_pointwise",
    ],
    "gemm_fp8": ["_fp8_gemm_kernel", "sm90_xmma_gemm_e4m3f16_e4m3f32_f32_tn_n_tilesize128x128x128_cublas",
                 "nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", "aten::_scaled_mm"],
    "gemm_act": ["_linear_act_kernel", "_linear_act_tma_kernel", "nvjet_sm90_hsh_64x8_64x16_1x2_h_bz_gelubias_TNT"],
    "attention": [
        "_flash_varlen_kernel", "_disentangled_kernel",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t,"
        " Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, false, true, true, false, "
        "false>(Flash_fwd_params)",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
        "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
        "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
    ],
    "norm": ["_add_layernorm_kernel", "_add_rmsnorm_kernel", "aten::native_layer_norm",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>"
             "(int, float, c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)"],
    "activation": ["_bias_act_kernel", "_glu_kernel", "aten::gelu", "aten::silu",
                   "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl("
                   "at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const"],
    "quantize": ["_quantize_rows_kernel", "aten::quantize_per_tensor"],
    "rotary": ["_rotary_kernel", "_qk_norm_rotary_kernel"],
    "embedding": ["_embed_kernel", "aten::embedding", "aten::index_select",
                  "void (anonymous namespace)::indexSelectLargeIndex<c10::Half, long, unsigned int, 2, 2, -2, true>"],
    "copy": ["Memcpy HtoD (Pinned -> Device)", "Memcpy DtoD (Device -> Device)", "Memset (Device)", "aten::copy_",
             "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
             "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const"],
    "other": ["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, "
              "at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<c10::Half>, at::detail::Array<char*, 3>)",
              "aten::add_", "aten::empty", "aten::transpose", "Kernel2"],
}


@pytest.mark.parametrize("category,name", [(c, n) for c, ns in NAMES.items() for n in ns])
def test_kernel_category_of_real_kernel_names(category, name):
    assert kernel_category(name) == category


def test_every_category_is_named_and_every_triton_kernel_of_ops_has_one():
    assert set(NAMES) == set(CATEGORIES)
    ops = Path(packformer.__file__).parent / "ops"
    kernels = {m for f in ops.glob("*.py") for m in re.findall(r"def (_\w*kernel)\(", f.read_text())}
    assert kernels == set(TRITON_KERNELS)
    assert set(TRITON_KERNELS.values()) <= set(CATEGORIES) - {"gemm", "copy", "other"}


def test_cpu_breakdown_of_packformer_against_the_floor(tiny_parts):
    r = run_profile(tiny_parts(), workload="tutorial_small", peers="packformer,floor", iterations=2, top=10,
                    breakdown=True, log=None)
    pf, fl = r["peers"]["packformer"], r["peers"][FLOOR]
    assert pf["status"] == fl["status"] == "ok"
    assert list(pf["categories"]) == list(CATEGORIES)
    assert pf["categories"]["gemm"] > 0 and pf["categories"]["attention"] > 0
    assert fl["categories"]["gemm"] > 0
    assert all(fl["categories"][c] == 0 for c in CATEGORIES if c not in ("gemm", "copy", "other"))
    # per forward: 4 GEMMs x 2 layers, in MKL (aten::addmm) or oneDNN, whichever the floor found faster
    gemms = [k for k in fl["kernels"] if k["name"] in ("aten::addmm", "mkldnn::_linear_pointwise")]
    assert sum(k["calls"] for k in gemms) == 8
    assert [k["ms"] for k in pf["kernels"]] == sorted((k["ms"] for k in pf["kernels"]), reverse=True)
    assert len(pf["kernels"]) <= 10
    assert r["breakdown"] == {"packformer": pf["categories"], FLOOR: fl["categories"]}
    assert r["wall_ms"]["packformer"] > 0 and r["wall_ms"][FLOOR] > 0
    assert r["x_floor_gemm"][FLOOR] == 1.0
    assert r["x_floor_gemm"]["packformer"] == pytest.approx(pf["categories"]["gemm"] / fl["categories"]["gemm"],
                                                            rel=1e-2)


def test_breakdown_ratios_need_the_floor_and_skip_skipped_peers():
    peers = {"packformer": {"status": "ok", "categories": {"gemm": 2.0, "gemm_act": 1.0, "norm": 5.0},
                            "wall_ms": 9.0},
             "packformer_fp8": {"status": "ok", "categories": {"gemm_fp8": 1.5, "quantize": 0.5}, "wall_ms": 3.0},
             "bt_nested": {"status": "skipped", "reason": "not installed"}}
    r = breakdown_of(peers)
    assert set(r["breakdown"]) == {"packformer", "packformer_fp8"} and "x_floor_gemm" not in r
    peers[FLOOR] = {"status": "ok", "categories": {"gemm": 2.0, "other": 1.0}, "wall_ms": 2.5}
    r = breakdown_of(peers)
    assert r["x_floor_gemm"] == {"packformer": 1.5, "packformer_fp8": 0.75, FLOOR: 1.0}
    assert r["wall_ms"] == {"packformer": 9.0, "packformer_fp8": 3.0, FLOOR: 2.5}


def test_eager_swaps_cuda_graphs_for_the_runner_they_wrap():
    from packformer.fast.graphs import GraphRunner

    fast = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16)
    eng = types.SimpleNamespace(model=types.SimpleNamespace(runner=GraphRunner(fast, 64, 64, 8)), notes="fast path")
    assert run_without_graphs(eng) and eng.model.runner is fast and "CUDA graphs off" in eng.notes
    assert not run_without_graphs(eng)                   # already eager (and the CPU path never has graphs)


@pytest.mark.gpu
def test_gpu_eager_breakdown_shows_each_kernel(tiny_parts):
    r = run_profile(tiny_parts(), device="cuda", workload="tutorial_small", peers="packformer,floor", iterations=2,
                    breakdown=True, eager=True, log=None)
    pf, fl = r["peers"]["packformer"], r["peers"][FLOOR]
    assert "CUDA graphs off" in pf["notes"]
    names = {k["name"] for k in pf["kernels"]}
    assert "_flash_varlen_kernel" in names and "_add_layernorm_kernel" in names
    assert pf["categories"]["attention"] > 0 and pf["categories"]["norm"] > 0
    assert fl["categories"]["gemm"] > 0 and fl["categories"]["attention"] == 0
    # kernels only: the aten ops that launched them add nothing, so the floor is its GEMMs (and their split-K
    # reductions) and nothing else
    assert fl["categories"]["gemm"] == pytest.approx(sum(fl["categories"].values()), rel=0.05)
    assert r["x_floor_gemm"][FLOOR] == 1.0


def test_the_fp8_floor_is_a_profiled_peer_of_its_own(tiny_parts):
    r = run_profile(tiny_parts(), workload="tutorial_small", peers="floor,floor_fp8", iterations=1, top=10,
                    breakdown=True, log=None)
    fp8 = r["peers"]["floor_fp8"]
    assert fp8["status"] == "ok" and "GEMM floor (e4m3)" in fp8["notes"]
    assert fp8["categories"]["gemm"] + fp8["categories"]["gemm_fp8"] > 0          # the CPU runs its reference
    assert r["x_floor_gemm"]["floor_fp8"] > 0 and r["x_floor_gemm"]["floor"] == 1.0


@pytest.mark.gpu
def test_gpu_fp8_floor_runs_the_e4m3_kernel(tiny_parts):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the e4m3 TMA GEMM needs Hopper or later")
    r = run_profile(tiny_parts(), device="cuda", workload="serve_b32", peers="floor,floor_fp8", iterations=1,
                    breakdown=True, log=None)
    cats = r["peers"]["floor_fp8"]["categories"]
    assert cats["gemm_fp8"] > 0 and cats["gemm"] == 0 and cats["quantize"] == 0    # inputs quantized beforehand
