"""What the kernels compile to for Hopper (sm90), checked on the CPU: Triton compiles for a target GPU
without one. The K/V loads of the attention kernels' key loops must be software-pipelined (asynchronous
copies into shared memory, `num_stages` deep) and their products wgmma: a change to a loop's shape or to
its pointer arithmetic can silently lose either, and only a GPU benchmark would show it. And every tile
config the fp8 GEMM is given must fit the shared memory of one H100 / H200 multiprocessor with its
epilogue, or its launch fails on the GPU alone.

The launcher marks pointers and integer arguments divisible by 16 (`tt.divisibility`) when they are;
without that hint the compiler cannot prove 16-byte aligned rows and falls back to plain loads, so the
compile here passes the same hints the fast path's launches get (contiguous fp16 rows, strides of fused
QKV views: multiples of 16)."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from packformer.ops import disentangled_flash, flash_varlen  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FUSION = dict(enable_fp_fusion=True)       # as the fast path's launches compile (Triton's default before 3.10)
pytestmark = pytest.mark.isa_free          # compiles only: the AVX2-capped rerun (test_isa_portability) skips it


def compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, hints: bool = True, unaligned: tuple = (),
                 num_warps: int = 4, num_stages: int = 3):
    """The kernel compiled for sm90 (`.asm["ttgir"]`, `.metadata.shared`): `pointers` name -> type (pointers,
    tensor descriptors); other non-constexpr args are int32 (fp32 for qk_scale); with `hints`, pointers and
    strides (but those named in `unaligned`) carry the launcher's divisible-by-16 hint."""
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in names}
    hinted = [n for n in names if hints and n not in unaligned and (sig[n].startswith("*") or n.startswith("stride"))]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
    return triton.compile(src, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages, **FUSION))


def ttgir(kernel, pointers: dict[str, str], constexprs: dict, **kw) -> str:
    return compile_sm90(kernel, pointers, constexprs, **kw).asm["ttgir"]


def assert_pipelined(ir: str) -> None:
    assert ir.count("async_copy") >= 4, "the key loop's K/V loads are not asynchronous copies (not pipelined)"
    assert "warp_group_dot" in ir, "the products are not wgmma"


FLASH_POINTERS = {n: "*fp16" for n in ("Q", "K", "V", "O")} | {"CU": "*i32", "TILES": "*i32", "BIAS_TILES": "*fp32",
                                                         "COS": "*fp32", "SIN": "*fp32"}
FLASH_PLAIN = dict(D=64, HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32, USE_TILES=True, SELF_INDEX=False, SEG_POW2=1,
                   BIAS=False, WINDOW=False, CAUSAL=False, ROTARY=False, HALF=16, INTERLEAVED=False)


@pytest.mark.parametrize("variant", [dict(), dict(BIAS=True, WINDOW=True), dict(CAUSAL=True)],
                         ids=["plain", "bias-window", "causal"])
def test_flash_varlen_key_loop_is_pipelined_on_hopper(variant):
    assert_pipelined(ttgir(flash_varlen._flash_varlen_kernel, FLASH_POINTERS, FLASH_PLAIN | variant))


def test_disentangled_key_loop_is_pipelined_on_hopper():
    ptrs = {n: "*fp16" for n in ("Q", "K", "V", "O", "C2P", "P2C")} | {"DIDX": "*i32", "CU": "*i32", "TILES": "*i32"}
    const = dict(D=64, HEAD_DIM=64, BLOCK_M=64, BLOCK_N=16, USE_TILES=True, HAS_C2P=True, HAS_P2C=True,
                 SPAN=256, MID=128)
    # the position tables' rows are 8-aligned only (aligned_rows): no hint on their strides
    assert_pipelined(ttgir(disentangled_flash._disentangled_kernel, ptrs, const, unaligned=("stride_ct", "stride_pt")))


def test_without_the_alignment_hint_the_loads_are_not_pipelined():
    # why the hints above matter: the same kernel compiled blind to alignment loses its asynchronous copies
    assert "async_copy" not in ttgir(flash_varlen._flash_varlen_kernel, FLASH_POINTERS, FLASH_PLAIN, hints=False)


H200_SHARED = 232448      # bytes of shared memory one program may use on an H100 / H200 (227 KB)


def fp8_gemm_shared(cfg, epilogue: str) -> int:
    """Shared memory of the fp8 GEMM kernel compiled for sm90 with tiles `cfg` and one of the epilogues the
    fp8 path gives its GEMMs: "bias" (QKV), "gelu" (bias + GELU, FFN1), "residual" (out-projection, FFN2)."""
    from packformer.ops import fp8

    desc = lambda dt, r, c: f"tensordesc<{dt}[{r}, {c}]>"     # noqa: E731
    gelu = epilogue == "gelu"
    const = dict(HAS_BIAS=epilogue != "residual", HAS_ACT=gelu, ACT=fp8.ACTS["gelu"] if gelu else 0,
                 HAS_RES=epilogue == "residual", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 GROUP_M=cfg.group_m)
    ptrs = {"a_desc": desc("fp8e4nv", cfg.block_m, cfg.block_k), "w_desc": desc("fp8e4nv", cfg.block_n, cfg.block_k),
            "c_desc": desc("fp16", cfg.block_m, cfg.block_n), "R": "*fp16", "SA": "*fp32", "SW": "*fp32",
            "BIAS": "*fp16"}
    return compile_sm90(fp8._fp8_gemm_kernel, ptrs, const, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages).metadata.shared


def test_every_fp8_gemm_tile_the_fast_path_picks_fits_in_shared_memory():
    from packformer.ops.fp8 import default_config

    # bert-base / xlmr-large roles (K, N, epilogues) at a query batch, a serve batch and an offline batch
    roles = ((768, 2304, ("bias",)), (768, 3072, ("gelu",)), (768, 768, ("residual", "bias")),
             (3072, 768, ("residual",)), (1024, 4096, ("gelu",)), (4096, 1024, ("residual",)))
    picked = {(default_config(m, n, k, residual=epi == "residual"), epi)
              for m in (521, 2209, 35201) for k, n, epis in roles for epi in epis}
    for cfg, epi in sorted(picked, key=str):
        assert fp8_gemm_shared(cfg, epi) <= H200_SHARED, (cfg, epi)


def test_a_residual_tile_of_128_x_256_in_3_stages_would_not_fit():
    # why residual GEMMs take RES: the residual's layout conversion needs the 128 x 256 tile in shared memory
    from packformer.ops.fp8 import LARGE, TileConfig

    assert fp8_gemm_shared(LARGE, "bias") <= H200_SHARED
    assert fp8_gemm_shared(TileConfig(128, 256, 128, 8, 8, 3), "residual") > H200_SHARED
