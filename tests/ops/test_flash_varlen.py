"""Triton varlen flash attention: the launcher's checks on CPU, the kernel under the Triton interpreter
(tiny shapes) and on a GPU against the fp32 per-sequence reference and torch's own varlen flash kernel."""
import pytest
import torch

from packformer.ops.attention import varlen_attention_ref
from packformer.ops.flash_varlen import FlashConfig, flash_varlen, tile_table


def _packed(lens, heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), 3, heads, dim, generator=g).to(device, dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return qkv.unbind(1), cu


def test_launcher_rejects_mismatched_shapes_dtypes_and_cu_seqlens():
    (q, k, v), cu = _packed([3, 5])
    with pytest.raises(ValueError, match="shape"):
        flash_varlen(q, k[:-1], v, cu, 5)
    with pytest.raises(ValueError, match="dtype"):
        flash_varlen(q, k.half(), v, cu, 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_varlen(q, k, v, cu.long(), 5)


def test_tile_table_lists_every_query_block_once_longest_sequences_first():
    lens = [3, 0, 130, 64, 65]
    table = tile_table(lens, 64)
    assert table.dtype.name == "int32" and table.shape == (1 + 0 + 3 + 1 + 2, 2)
    assert sorted(map(tuple, table.tolist())) == [(0, 0), (2, 0), (2, 1), (2, 2), (3, 0), (4, 0), (4, 1)]
    assert [lens[b] for b in table[:, 0]] == sorted((lens[b] for b in table[:, 0]), reverse=True)
    assert tile_table([], 64).shape == (0, 2)


def test_launcher_without_a_kernel_runs_the_reference():
    (q, k, v), cu = _packed([3, 0, 5])
    assert torch.allclose(flash_varlen(q, k, v, cu, 5), varlen_attention_ref(q, k, v, cu), atol=1e-6)


def test_kernel_under_triton_interpreter(run_interpreted):
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        # Triton 3.6's interpreter cannot use a loop bound computed from a loaded value (seen on the GPU
        # image); the GPU tests below cover that version on hardware
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel's key loop")
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.attention import varlen_attention_ref
        from packformer.ops.flash_varlen import FlashConfig, flash_varlen, tile_table
        assert _triton.INTERPRET
        g = torch.Generator().manual_seed(0)
        lens = [1, 7, 33, 0, 32, 20]                     # a 1-token, an empty, a block-exact and ragged ones
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        for dim in (16, 24):                              # 24: head size padded to the next power of two
            q, k, v = torch.randn(sum(lens), 3, 2, dim, generator=g).unbind(1)   # strided views, as in the encoder
            want = varlen_attention_ref(q, k, v, cu, scale=0.3)
            for cfg in (FlashConfig(16, 16, 4, 1), FlashConfig(32, 16, 4, 1)):
                # the host table, the grid that finds its blocks from cu_seqlens, the dense grid
                for tiles, dense in ((torch.from_numpy(tile_table(lens, cfg.block_m)), False), (None, False),
                                     (None, True)):
                    out = torch.full_like(q, float("nan"))
                    got = flash_varlen(q, k, v, cu, max(lens), scale=0.3, out=out, config=cfg, tiles=tiles,
                                       dense=dense)
                    assert got is out and torch.isfinite(got).all()
                    assert (got - want).abs().max().item() < 1e-5, (dim, cfg, tiles is None, dense)
        print("ok")
    """)


# ---- on a GPU ----------------------------------------------------------------------------------------
LENS = [1, 7, 64, 130, 512, 96, 0, 33]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 40])
@pytest.mark.parametrize("config", [None, FlashConfig(128, 64, 8, 2), FlashConfig(32, 32, 4, 2)])
def test_gpu_matches_the_fp32_reference(dtype, dim, config):
    (q, k, v), cu = _packed(LENS, heads=3, dim=dim, dtype=dtype, device="cuda")
    got = flash_varlen(q, k, v, cu, max(LENS), config=config)
    want = varlen_attention_ref(q, k, v, cu)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.isfinite(got).all() and (got.float() - want.float()).abs().max() <= tol
    block_m = (config or FlashConfig()).block_m
    tiles = torch.from_numpy(tile_table(LENS, block_m)).cuda()
    assert torch.equal(flash_varlen(q, k, v, cu, max(LENS), config=config, tiles=tiles), got)
    assert torch.equal(flash_varlen(q, k, v, cu, max(LENS), config=config, dense=True), got)


@pytest.mark.gpu
def test_gpu_agrees_with_torch_varlen_flash_attention():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    (q, k, v), cu = _packed(LENS, heads=12, dim=64, dtype=torch.float16, device="cuda")
    got = flash_varlen(q, k, v, cu, max(LENS))
    want = varlen.varlen_attn(q, k, v, cu, cu, max(LENS), max(LENS))
    assert (got.float() - want.float()).abs().max() <= 2e-3


@pytest.mark.gpu
def test_gpu_a_sequence_is_unaffected_by_its_neighbours():
    (q, k, v), cu = _packed([40, 100, 25], heads=4, dim=64, dtype=torch.float16, device="cuda")
    both = flash_varlen(q, k, v, cu, 100)
    alone = flash_varlen(q[40:140], k[40:140], v[40:140], torch.tensor([0, 100], dtype=torch.int32, device="cuda"), 512)
    assert torch.equal(both[40:140], alone)


@pytest.mark.gpu
def test_gpu_empty_segments_replay_in_a_cuda_graph():
    (q, k, v), _ = _packed([30, 50, 20], heads=4, dim=64, dtype=torch.float16, device="cuda")
    cu = torch.tensor([0, 30, 80, 100, 100, 100], dtype=torch.int32, device="cuda")
    want = flash_varlen(q, k, v, cu, 128)
    out = torch.empty_like(q)
    flash_varlen(q, k, v, cu, 128, out=out)          # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flash_varlen(q, k, v, cu, 128, out=out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
