"""Triton varlen flash attention: the launcher's checks on CPU, the kernel under the Triton interpreter
(tiny shapes) and on a GPU against the fp32 per-sequence reference and torch's own varlen flash kernel."""
import pytest
import torch

from packformer.ops.attention import PositionBias, varlen_attention_ref
from packformer.ops.flash_varlen import FlashConfig, LOG2E, bias_tiles, flash_varlen, tile_table


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


def test_launcher_rejects_bad_bias_tables_and_windows():
    (q, k, v), cu = _packed([3, 5])                  # 2 heads
    for bad in (torch.zeros(3, 5), torch.zeros(2, 4), torch.zeros(5), torch.zeros(2, 5, dtype=torch.float16),
                torch.zeros(2, 5, device="meta"), torch.zeros(5, 2).T):
        with pytest.raises(ValueError, match=r"bias_table must be a \[H=2, 2R\+1\] fp32"):
            flash_varlen(q, k, v, cu, 5, bias_table=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="window must be an int >= 0"):
            flash_varlen(q, k, v, cu, 5, window=bad)


def test_launcher_without_a_kernel_runs_the_reference_with_the_bias():
    (q, k, v), cu = _packed([3, 0, 9])
    table = torch.randn(2, 7)
    for bias in (PositionBias(table), PositionBias(window=2), PositionBias(table, 2)):
        want = varlen_attention_ref(q, k, v, cu, 0.3, bias)
        assert torch.equal(flash_varlen(q, k, v, cu, 9, 0.3, bias_table=bias.table, window=bias.window), want)


def test_bias_tiles_hold_the_table_per_key_block_offset_and_are_cached_per_table():
    table = torch.randn(2, 2 * 5 + 1)                      # R = 5
    tiles, koff, n = bias_tiles(table, 8, 4)               # 8 query rows, 4 keys per block
    assert tiles.shape == (2, n * 8 * 4)
    t = tiles.view(2, n, 8, 4) / LOG2E                     # [H, n, BM, BN]
    for i in range(n):
        rel = (i - koff) * 4 + torch.arange(4)[None, :] - torch.arange(8)[:, None]   # key minus query position
        assert torch.allclose(t[:, i], table[:, rel.clamp(-5, 5) + 5])
    # offsets beyond the first and last tiles see a constant bias, which those tiles already are
    assert torch.allclose(t[:, 0], table[:, :1, None].expand(2, 8, 4))
    assert torch.allclose(t[:, -1], table[:, -1:, None].expand(2, 8, 4))
    assert bias_tiles(table, 8, 4)[0] is tiles             # one build per table and tile shape
    table.mul_(2.0)                                        # an in-place update rebuilds
    again = bias_tiles(table, 8, 4)[0]
    assert again is not tiles and torch.allclose(again, 2 * tiles)
    with torch.inference_mode():                           # no version counter there: cached by identity
        frozen = torch.randn(2, 11)
        assert bias_tiles(frozen, 8, 4)[0] is bias_tiles(frozen, 8, 4)[0]


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
        from packformer.ops.flash_varlen import FlashConfig, LOG2E, bias_tiles, flash_varlen, tile_table
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


def test_kernel_with_position_bias_and_window_under_triton_interpreter(run_interpreted):
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel's key loop")
    run_interpreted("""
        import torch
        from packformer.ops import _triton
        from packformer.ops.attention import PositionBias, varlen_attention_ref
        from packformer.ops.flash_varlen import FlashConfig, LOG2E, bias_tiles, flash_varlen, tile_table
        assert _triton.INTERPRET
        g = torch.Generator().manual_seed(0)
        # with 32-row query blocks, 16-key blocks and window 5 the 70-token sequence's blocks skip key
        # blocks on both sides (the ragged one too); R = 4 is reached both ways inside most sequences
        lens = [1, 9, 70, 0, 16, 23]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        cfg = FlashConfig(32, 16, 4, 1)
        table = torch.randn(2, 2 * 4 + 1, generator=g) * 2                     # [H, 2R+1]
        modes = {"tiles": (torch.from_numpy(tile_table(lens, cfg.block_m)), False), "self-indexed": (None, False),
                 "dense": (None, True)}
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            q, k, v = torch.randn(sum(lens), 3, 2, 16, generator=g).to(dtype).unbind(1)   # strided views
            for bias in (PositionBias(table), PositionBias(window=5), PositionBias(table, 5)):
                want = varlen_attention_ref(q, k, v, cu, scale=0.3, bias=bias)
                for mode, (tiles, dense) in modes.items():
                    if dtype == torch.float16 and bias.table is None:
                        continue                       # fp16: the bias alone and both, enough for rounding
                    out = torch.full_like(q, float("nan"))
                    got = flash_varlen(q, k, v, cu, max(lens), scale=0.3, out=out, config=cfg, tiles=tiles,
                                       dense=dense, bias_table=bias.table, window=bias.window)
                    err = (got.float() - want.float()).abs().max().item()
                    assert got is out and torch.isfinite(got).all() and err < tol, (dtype, bias, mode, err)
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


def _lognormal_lens(total: int, cap: int, seed: int = 0) -> list[int]:
    """Encoder-like lengths (median about 100 tokens) up to `cap`, about `total` tokens in all."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.empty(1).log_normal_(4.6, 0.8, generator=g).clamp(1, cap)))
    return lens + [cap, 1, 0]      # the cap and a single token always present, an empty segment too


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mpnet", "modernbert-local", "both"])
def test_gpu_position_bias_and_window_match_the_fp32_reference_on_realistic_shapes(kind, dtype):
    """MPNet-like: a R = 128 table (shared by the layers) on lengths up to 512; ModernBERT-like: window 64
    on lengths up to 1024; T about 8k tokens, 12 heads of 64."""
    cap = 512 if kind == "mpnet" else 1024
    lens = _lognormal_lens(8192, cap)
    (q, k, v), cu = _packed(lens, heads=12, dim=64, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(12, 2 * 128 + 1, generator=g) * 2).cuda() if kind != "modernbert-local" else None
    window = 64 if kind != "mpnet" else 0
    bias = PositionBias(table, window)
    got = flash_varlen(q, k, v, cu, max(lens), bias_table=table, window=window)
    want = varlen_attention_ref(q, k, v, cu, bias=bias)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.isfinite(got).all() and (got.float() - want.float()).abs().max() <= tol
    # every grid mode computes each block the same way: the same bits
    for config in (None, FlashConfig(128, 64, 8, 2)):
        base = flash_varlen(q, k, v, cu, max(lens), config=config, bias_table=table, window=window)
        tiles = torch.from_numpy(tile_table(lens, (config or FlashConfig()).block_m)).cuda()
        assert torch.equal(flash_varlen(q, k, v, cu, max(lens), config=config, tiles=tiles, bias_table=table,
                                        window=window), base)
        assert torch.equal(flash_varlen(q, k, v, cu, max(lens), config=config, dense=True, bias_table=table,
                                        window=window), base)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 40])
def test_gpu_bias_and_window_with_fp32_and_odd_head_sizes(dim):
    (q, k, v), cu = _packed(LENS, heads=3, dim=dim, dtype=torch.float32, device="cuda")
    table = torch.randn(3, 2 * 16 + 1, device="cuda")
    got = flash_varlen(q, k, v, cu, max(LENS), bias_table=table, window=20)
    want = varlen_attention_ref(q, k, v, cu, bias=PositionBias(table, 20))
    assert (got - want).abs().max() <= 5e-3      # tf32 dot products in the kernel


@pytest.mark.gpu
def test_gpu_a_biased_sequence_is_unaffected_by_its_neighbours_and_replays_in_a_cuda_graph():
    (q, k, v), cu = _packed([40, 300, 25], heads=4, dim=64, dtype=torch.float16, device="cuda")
    table = torch.randn(4, 2 * 128 + 1, device="cuda")
    both = flash_varlen(q, k, v, cu, 300, bias_table=table, window=64)
    alone = flash_varlen(q[40:340], k[40:340], v[40:340], torch.tensor([0, 300], dtype=torch.int32, device="cuda"),
                         512, bias_table=table, window=64)
    assert torch.equal(both[40:340], alone)
    out = torch.empty_like(q)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flash_varlen(q, k, v, cu, 512, out=out, bias_table=table, window=64)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, both)


# ---- RoPE inside the kernel ---------------------------------------------------------------------------
def _rope(lens, dim, interleaved=False, device="cpu", base=100.0):
    """(cos, sin, cfg) for packed `lens`: positions restart at 0 per sequence."""
    from packformer.ops.rotary import RotaryConfig, rotary_tables
    cfg = RotaryConfig(base=base, interleaved=interleaved)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    return (*rotary_tables(pos, cfg, dim), cfg)


def _rotated_ref(q, k, v, cu, rope, **kw):
    """The specification: rotate q and k (rotary.apply_rotary_ref), then attend (varlen_attention_ref)."""
    from packformer.ops.rotary import apply_rotary_ref
    qr, kr = apply_rotary_ref(q, k, *rope)
    return varlen_attention_ref(qr, kr, v, cu, **kw)


def test_rotary_is_fused_for_whole_power_of_two_heads_only():
    from packformer.ops.flash_varlen import rotary_fused
    from packformer.ops.rotary import RotaryConfig
    assert rotary_fused(RotaryConfig(), 64) and rotary_fused(RotaryConfig(interleaved=True), 32)
    assert not rotary_fused(RotaryConfig(dim=32), 64)      # partial: a separate pass first
    assert not rotary_fused(RotaryConfig(), 48)            # halves of 24 dims: no tensor-core tile
    assert not rotary_fused(RotaryConfig(), 16)            # halves of 8 dims: below the dot's minimum


def test_launcher_without_a_kernel_rotates_then_attends_and_leaves_q_and_k_alone():
    (q, k, v), cu = _packed([3, 0, 9], dim=16)
    q0, k0 = q.clone(), k.clone()
    for interleaved in (False, True):
        rope = _rope([3, 0, 9], 16, interleaved)
        got = flash_varlen(q, k, v, cu, 9, 0.3, window=4, rotary=rope)
        assert torch.allclose(got, _rotated_ref(q, k, v, cu, rope, scale=0.3, bias=PositionBias(window=4)), atol=1e-6)
        assert torch.equal(q, q0) and torch.equal(k, k0)
    for bad in (rope[:2], list(rope), (rope[0], rope[1], {"base": 100.0}), (None, rope[1], rope[2])):
        with pytest.raises(ValueError, match="rotary must be"):
            flash_varlen(q, k, v, cu, 9, rotary=bad)
    with pytest.raises(ValueError, match="cos and sin must be"):          # tables of another batch
        flash_varlen(q, k, v, cu, 9, rotary=(rope[0][:5], rope[1][:5], rope[2]))


def test_kernel_with_rotary_under_triton_interpreter(run_interpreted):
    """The in-kernel RoPE against rotating first: both pair layouts, fp32 and fp16, plain, windowed and
    biased, every grid mode; the fallback is made to fail, so the fused kernel is what ran."""
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel's key loop")
    run_interpreted("""
        import torch
        from packformer.ops import _triton, flash_varlen as fv
        from packformer.ops.attention import PositionBias, varlen_attention_ref
        from packformer.ops.rotary import RotaryConfig, apply_rotary_ref, rotary_tables
        assert _triton.INTERPRET
        def refuse(*a, **k):
            raise AssertionError("the rotated-copy fallback ran")
        fv.apply_rotary_ = fv.apply_rotary_ref = refuse
        g = torch.Generator().manual_seed(0)
        lens = [1, 7, 40, 0, 32, 21]                      # block-exact, ragged, one token, empty
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens])
        cfg = fv.FlashConfig(16, 16, 4, 1)
        table = torch.randn(2, 2 * 4 + 1, generator=g) * 2
        modes = ((torch.from_numpy(fv.tile_table(lens, cfg.block_m)), False), (None, False), (None, True))
        for interleaved in (False, True):
            rc = RotaryConfig(base=50.0, interleaved=interleaved)
            cos, sin = rotary_tables(pos, rc, 32)
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
                q, k, v = torch.randn(sum(lens), 3, 2, 32, generator=g).to(dtype).unbind(1)   # strided views
                q0, k0 = q.clone(), k.clone()
                qr, kr = apply_rotary_ref(q, k, cos, sin, rc)
                for bias in (None, PositionBias(window=5), PositionBias(table)):
                    want = varlen_attention_ref(qr, kr, v, cu, scale=0.3, bias=bias)
                    for tiles, dense in modes:
                        got = fv.flash_varlen(q, k, v, cu, max(lens), scale=0.3, config=cfg, tiles=tiles,
                                              dense=dense, window=bias.window if bias else 0,
                                              bias_table=bias.table if bias else None, rotary=(cos, sin, rc))
                        err = (got.float() - want.float()).abs().max().item()
                        assert torch.isfinite(got).all() and err < tol, (interleaved, dtype, bias, err)
                assert torch.equal(q, q0) and torch.equal(k, k0)
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim,interleaved,window", [(64, False, 0), (64, False, 64), (64, True, 0), (128, False, 0),
                                                     (32, False, 0)])
def test_gpu_rotary_inside_the_kernel_matches_rotating_first(dtype, dim, interleaved, window):
    """ModernBERT / GTE / NomicBERT / Jina-like heads on encoder-like lengths up to 1024: the fused kernel
    against the fp32 reference, and against the separate rotary pass + the plain kernel."""
    from packformer.ops.rotary import apply_rotary_
    lens = _lognormal_lens(8192, 1024)
    (q, k, v), cu = _packed(lens, heads=12, dim=dim, dtype=dtype, device="cuda")
    rope = _rope(lens, dim, interleaved, device="cuda", base=10000.0)
    got = flash_varlen(q, k, v, cu, max(lens), window=window, rotary=rope)
    want = _rotated_ref(q, k, v, cu, rope, bias=PositionBias(window=window) if window else None)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.isfinite(got).all() and (got.float() - want.float()).abs().max() <= tol
    qr, kr = apply_rotary_(q.clone(), k.clone(), *rope)
    two_pass = flash_varlen(qr, kr, v, cu, max(lens), window=window)
    assert (got.float() - two_pass.float()).abs().max() <= tol / 2


@pytest.mark.gpu
def test_gpu_a_rotated_sequence_is_unaffected_by_its_neighbours_and_replays_in_a_cuda_graph():
    lens = [40, 300, 25]
    (q, k, v), cu = _packed(lens, heads=4, dim=64, dtype=torch.float16, device="cuda")
    cos, sin, rc = _rope(lens, 64, device="cuda")
    both = flash_varlen(q, k, v, cu, 300, rotary=(cos, sin, rc))
    alone = flash_varlen(q[40:340], k[40:340], v[40:340], torch.tensor([0, 300], dtype=torch.int32, device="cuda"),
                         512, rotary=(cos[40:340].contiguous(), sin[40:340].contiguous(), rc))
    assert torch.equal(both[40:340], alone)
    out = torch.empty_like(q)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flash_varlen(q, k, v, cu, 512, out=out, rotary=(cos, sin, rc))
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, both)
