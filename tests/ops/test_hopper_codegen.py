"""What the attention kernels compile to for Hopper (sm90), checked on the CPU: Triton compiles for a
target GPU without one. The K/V loads of the key loop must be software-pipelined (asynchronous copies
into shared memory, `num_stages` deep) and the products must be wgmma: a change to a loop's shape or to
its pointer arithmetic can silently lose either, and only a GPU benchmark would show it.

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


def ttgir(kernel, pointers: dict[str, str], constexprs: dict, hints: bool = True, unaligned: tuple = ()) -> str:
    """The kernel's TritonGPU IR for sm90 (3 stages, 4 warps): `pointers` name -> type; other non-constexpr
    args are int32 (fp32 for qk_scale); with `hints`, pointers and strides (but those named in `unaligned`)
    carry the launcher's divisible-by-16 hint."""
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in names}
    hinted = [n for n in names if hints and n not in unaligned and (sig[n].startswith("*") or n.startswith("stride"))]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
    return triton.compile(src, target=HOPPER, options=dict(num_warps=4, num_stages=3)).asm["ttgir"]


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
