"""Fused embeddings (gather word + position (+ type) + LayerNorm): reference on CPU, kernel under the
interpreter and on GPU."""
import pytest
import torch
import torch.nn.functional as F

from packformer.ops.embedding import embed_layernorm, embed_layernorm_ref


def _tables(v, p, h, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return mk(v, h), mk(p, h), mk(2, h), mk(h) * 0.1 + 1, mk(h)


def _ids(t, v, p, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randint(0, v, (t,), generator=g).to(device), torch.randint(0, p, (t,), generator=g).to(device),
            torch.randint(0, 2, (t,), generator=g).to(device))


def test_ref_matches_the_unfused_embedding_sum_and_layernorm():
    word, pos, types, w, b = _tables(50, 20, 16, torch.float64)
    ids, positions, tt = _ids(9, 50, 20)
    want = F.layer_norm(word[ids] + pos[positions] + types[tt], (16,), w, b, 1e-12)
    assert torch.allclose(embed_layernorm_ref(ids, positions, tt, word, pos, types, w, b, 1e-12), want)


def test_ref_without_token_types_adds_segment_zero_and_without_norm_skips_it():
    word, pos, types, w, b = _tables(50, 20, 16, torch.float64)
    ids, positions, _ = _ids(9, 50, 20)
    got = embed_layernorm_ref(ids, positions, None, word, pos, types, None, None, 0.0)
    assert torch.allclose(got, word[ids] + pos[positions] + types[0])
    assert torch.allclose(embed_layernorm_ref(ids, positions, None, word, pos, None, None, None, 0.0),
                          word[ids] + pos[positions])


def test_launcher_checks_shapes():
    word, pos, types, w, b = _tables(50, 20, 16, torch.float32)
    ids, positions, _ = _ids(9, 50, 20)
    with pytest.raises(ValueError, match="positions"):
        embed_layernorm(ids, positions[:5], None, word, pos, types, w, b, 1e-12)
    with pytest.raises(ValueError, match="together"):
        embed_layernorm(ids, positions, None, word, pos, types, w, None, 1e-12)
    with pytest.raises(ValueError, match="integers"):
        embed_layernorm(ids.float(), positions, None, word, pos, types, w, b, 1e-12)


def test_kernel_under_triton_interpreter(run_interpreted):
    run_interpreted("""
        import torch
        from packformer.ops.embedding import embed_layernorm, embed_layernorm_ref
        g = torch.Generator().manual_seed(0)
        for dt in (torch.float16, torch.float32):
            word, pos, types = (torch.randn(n, 40, generator=g).to(dt) for n in (50, 20, 2))
            w, b = torch.randn(40, generator=g).to(dt), torch.randn(40, generator=g).to(dt)
            ids, p, tt = torch.randint(0, 50, (11,)), torch.randint(0, 20, (11,)), torch.randint(0, 2, (11,))
            for args in ((tt, types, w, b), (None, types, w, b), (None, None, None, None)):
                t_, ty, ww, bb = args
                out = torch.full((11, 40), float("nan"), dtype=dt)
                y = embed_layernorm(ids, p, t_, word, pos, ty, ww, bb, 1e-12, out=out)
                ref = embed_layernorm_ref(ids, p, t_, word, pos, ty, ww, bb, 1e-12)
                tol = 8e-3 if dt == torch.float16 else 1e-5
                assert y is out and (y.float() - ref.float()).abs().max() <= tol, (dt, args[0] is None)
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, with_tt", [(384, False), (768, True), (1024, False), (100, True)])
def test_kernel_matches_reference_on_gpu(dtype, h, with_tt, near_exact):
    word, pos, types, w, b = _tables(30522, 512, h, dtype, "cuda", seed=h)
    ids, positions, tt = _ids(2000, 30522, 512, "cuda", seed=h)
    tt = tt if with_tt else None
    out = torch.full((2000, h), float("nan"), dtype=dtype, device="cuda")
    got = embed_layernorm(ids, positions, tt, word, pos, types, w, b, 1e-12, out=out)
    s = word.double()[ids] + pos.double()[positions] + (types.double()[tt] if with_tt else types[0].double())
    exact = F.layer_norm(s, (h,), w.double(), b.double(), 1e-12)
    near_exact(got, embed_layernorm_ref(ids, positions, tt, word, pos, types, w, b, 1e-12), exact)
