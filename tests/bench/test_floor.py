"""The GEMM floor runs exactly the four matmuls per layer with the model's own weights."""
import pytest
import torch
import torch.nn.functional as F

from packformer.bench.floor import GemmFloor
from packformer.config import EncoderConfig
from packformer.model import Encoder

CFG = EncoderConfig(vocab_size=100, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=40)


def test_floor_uses_the_models_weights_and_counts_flops():
    enc = Encoder(CFG)
    f = GemmFloor(enc, "cpu", torch.float32)
    assert len(f.layers) == 3
    assert torch.equal(f.layers[1][2][0], enc.layers[1].ffn1.weight)
    h, i = 16, 40
    assert f.flops(10) == 2 * 10 * 3 * (3 * h * h + h * h + i * h + h * i)


def test_floor_runner_is_the_last_layers_ffn_on_the_last_pass(monkeypatch):
    enc = Encoder(CFG)
    f = GemmFloor(enc, "cpu", torch.float32)
    f.packed = None                   # F.linear for every role (the oneDNN choice: the test below)
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(tuple(x.shape)) or real_linear(x, w, b))
    out = f.runner([7, 0, 5])()
    assert out.shape == (5, 16)
    # 2 passes (a zero-token pass is dropped) x 3 layers x 4 GEMMs, each on [T, H] (FFN2 on [T, I])
    assert len(seen) == 2 * 3 * 4
    assert seen[:4] == [(7, 16), (7, 16), (7, 16), (7, 40)]


def test_a_graph_floor_needs_a_gpu():
    f = GemmFloor(Encoder(CFG), "cpu", torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        f.runner([4], graph=True)


@pytest.mark.gpu
def test_gpu_floor_replays_one_captured_graph_with_the_eager_result(monkeypatch):
    enc = Encoder(CFG)
    f = GemmFloor(enc, "cuda", torch.float16)
    eager = f.runner([7, 5], graph=False)()
    replay = f.runner([7, 5])                  # the default on a GPU: captured here, as a CUDA graph
    launched, replays = [], []
    real_linear, real_replay = F.linear, torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(F, "linear", lambda *a, **kw: launched.append(1) or real_linear(*a, **kw))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real_replay(self))
    first = replay().clone()
    second = replay()
    # each call is one graph replay: none of the 2 x 3 x 4 GEMMs is launched from Python
    assert launched == [] and len(replays) == 2
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_floor_runs_an_attention_width_apart_from_the_hidden_size():
    """Qwen3-0.6B: 16 heads of 128 = 2048 wide attention in a 1024 hidden size; GQA's QKV is narrower."""
    import dataclasses

    from packformer import families  # noqa: F401  (registers the presets)
    from packformer.config import preset
    cfg = dataclasses.replace(preset("qwen3-embedding-0.6b"), num_layers=1, hidden_size=64, num_heads=4,
                              num_kv_heads=2, head_size=32, intermediate_size=96, vocab_size=100)
    floor = GemmFloor(Encoder(cfg), "cpu", torch.float32)
    assert floor.attn == 128 and floor.runner([5], graph=False)().shape == (5, 64)


def test_cpu_floor_runs_each_gemm_in_the_faster_library_and_says_which(monkeypatch):
    """On a CPU each role runs in F.linear (MKL) or oneDNN's packed GEMM, whichever the timing picks;
    either way the result is the same GEMM."""
    import packformer.bench.floor as floor_mod
    from packformer.fast.cpu_linear import onednn_available
    if not onednn_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear ops: the floor is F.linear only")
    enc = Encoder(CFG)
    f = GemmFloor(enc, "cpu", torch.float32)
    from types import SimpleNamespace
    picks = iter([1.0, 2.0] * 2 + [2.0, 1.0] * 2)     # mkl, onednn per role: mkl wins twice, then onednn
    monkeypatch.setattr(floor_mod, "measure", lambda fn, *a, **kw: (SimpleNamespace(median_ms=next(picks)), None))
    run = f.runner([7, 5, 9])
    assert f.backends == {"qkv": "mkl", "out": "mkl", "ffn1": "onednn", "ffn2": "onednn"}
    g = torch.Generator().manual_seed(0)               # the runner's last pass input, as it draws them
    for t in (7, 5):
        torch.randn(t, 16, generator=g), torch.randn(t, 16, generator=g), torch.randn(t, 40, generator=g)
    _, _, xi = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g), torch.randn(9, 40, generator=g)
    last = enc.layers[-1].ffn2
    with torch.inference_mode():
        assert torch.allclose(run(), F.linear(xi, last.weight, last.bias), atol=1e-5)


def test_fp8_floor_runs_the_e4m3_gemms_on_inputs_quantized_once(monkeypatch):
    """fp8=True: each GEMM is fp8_linear on the weight's e4m3 codes and per-channel scales; the inputs are
    quantized when the runner is built, so the timed call holds the GEMMs alone."""
    from packformer.ops import fp8 as F8

    enc = Encoder(CFG)
    f = GemmFloor(enc, "cpu", torch.float32, fp8=True)
    wq, ws = F8.quantize_weight(enc.layers[1].ffn1.weight)
    assert torch.equal(f.quantized[1][2][0], wq) and torch.equal(f.quantized[1][2][1], ws)
    quantized, gemms = [], []
    real = F8.fp8_linear
    monkeypatch.setattr(F8, "quantize_rows", lambda *a, **k: quantized.append(1) or F8.quantize_rows_ref(*a, **k))
    monkeypatch.setattr(F8, "fp8_linear",
                        lambda a, w, *r, **k: gemms.append((a.q.dtype, w.dtype)) or real(a, w, *r, **k))
    run = f.runner([7, 5])
    assert len(quantized) == 2 * 3 and not gemms          # each pass's three inputs, when the runner is built
    out = run()
    assert out.shape == (5, 16) and out.dtype == torch.float16 and torch.isfinite(out).all()
    assert len(quantized) == 2 * 3 and len(gemms) == 2 * 3 * 4 and set(gemms) == {(F8.E4M3, F8.E4M3)}
    # the last GEMM is FFN2 of the last layer on the last pass, through the e4m3 reference
    x = torch.randn(5, 40)
    a = F8.quantize_rows_ref(x)
    w2, s2, b2 = f.quantized[2][3]
    assert torch.allclose(F8.fp8_linear(a, w2, s2, b2, out_dtype=torch.float16).float(),
                          F8.fp8_linear_ref(a, w2, s2, b2, out_dtype=torch.float16).float())
