"""The encode()/classify() pipeline: chunked tokenization in a background thread, results in input order."""
import os

import numpy as np
import pytest
import torch

from packformer.config import EncoderConfig
from packformer.engine import Model
from packformer.heads import ClassificationHead, Pooler
from packformer.loaders.parts import ModelParts
from packformer.model import Encoder
from packformer.pipeline import PipelineConfig, RunStats, run_texts, text_ranges, tokenize_range


def _tokenizer(cfg):
    from packformer.loaders.hf import load_tokenizer
    d = os.environ.get("PACKFORMER_MINILM_DIR")
    if d is None:
        from packformer.loading import builtin_model_dir
        d = builtin_model_dir()
    from pathlib import Path
    return load_tokenizer(Path(d), cfg)


def tiny_model(device="cpu", dtype=None, num_labels=0, max_seq_length=64):
    cfg = EncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_labels=num_labels)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    head = ClassificationHead(32, num_labels) if num_labels else None
    parts = ModelParts(config=cfg, encoder=enc, head=head, pooler=Pooler("mean", normalize=True),
                       tokenizer=_tokenizer(cfg), max_seq_length=max_seq_length, source="tiny", format="random")
    return Model(parts, device=device, dtype=dtype, max_batch_tokens=256)


TEXTS = [("packed " * (i % 23 + 1) + f"text number {i}").strip() for i in range(57)]
SMALL = PipelineConfig(first_chunk=5, chunk=11, prefetch=2, inflight=2)


def one_by_one(model, texts):
    return torch.cat([model.embed_batch(model.tokenize([t])) for t in texts])


def test_text_ranges_cover_the_input_once_in_order():
    r = list(text_ranges(57, 5, 11))
    assert r[0] == (0, 5) and r[-1][1] == 57 and all(a[1] == b[0] for a, b in zip(r, r[1:]))
    assert [e - s for s, e in r] == [5, 11, 11, 11, 11, 8]
    assert list(text_ranges(0, 5, 11)) == []


def test_results_are_in_input_order_and_equal_to_one_text_at_a_time():
    m = tiny_model()
    got = run_texts(m, TEXTS, lambda b: m.embed_batch(b), m.dim, config=SMALL)
    assert torch.allclose(got, one_by_one(m, TEXTS), atol=1e-5)


def test_batch_size_and_token_budget_do_not_change_results():
    m = tiny_model()
    a = run_texts(m, TEXTS, lambda b: m.embed_batch(b), m.dim, batch_size=3, config=SMALL)
    b = run_texts(m, TEXTS, lambda b: m.embed_batch(b), m.dim, config=PipelineConfig(first_chunk=100))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(bad):
    m = tiny_model()
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer or None, got {bad!r}"):
        m.encode(TEXTS, batch_size=bad)


def test_encode_uses_the_pipeline_and_keeps_its_contract():
    m = tiny_model()
    out = m.encode(TEXTS)
    assert isinstance(out, np.ndarray) and out.shape == (57, 32)
    assert np.allclose(out, one_by_one(m, TEXTS).numpy(), atol=1e-5)
    assert m.encode([]).shape == (0, 32)
    assert m.encode("one text").shape == (32,)


def embed_recording_tokens(m):
    """(fn for run_texts embedding each batch, the list of each batch's token count it fills in)."""
    seen = []

    def fn(b):
        seen.append(b.num_tokens)
        return m.embed_batch(b)
    return fn, seen


def test_every_batch_but_the_last_is_filled_across_tokenizer_chunks():
    m = tiny_model()
    fn, seen = embed_recording_tokens(m)
    run_texts(m, TEXTS, fn, m.dim, config=SMALL)
    longest = max(len(s) for s in m.token_ids(TEXTS))
    assert sum(seen) == sum(len(s) for s in m.token_ids(TEXTS))
    assert all(n > m.max_batch_tokens - longest for n in seen[:-1]), seen


def test_stats_count_the_tokens_and_batches_run():
    m = tiny_model()
    fn, seen = embed_recording_tokens(m)
    stats = RunStats()
    run_texts(m, TEXTS, fn, m.dim, config=SMALL, stats=stats)
    assert stats.tokens == sum(len(s) for s in m.token_ids(TEXTS)) == sum(seen)
    assert stats.batches == len(seen) > 1
    assert stats.tokenize_wait_s >= 0


def test_embed_texts_is_encode_without_its_output_options():
    m = tiny_model()
    stats = RunStats()
    got = m.embed_texts(TEXTS, stats=stats)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (57, 32)
    assert np.array_equal(got.numpy(), m.encode(TEXTS))
    assert stats.tokens == sum(len(s) for s in m.token_ids(TEXTS))


def test_truncation_error_names_the_index_in_the_whole_input():
    m = tiny_model(max_seq_length=16)
    texts = ["short"] * 30 + ["long " * 40] + ["short"] * 5
    with pytest.raises(ValueError, match=r"texts\[30\] has 42 tokens, more than the model's maximum of 16"):
        run_texts(m, texts, lambda b: m.embed_batch(b), m.dim, truncate=False, config=SMALL)
    out = run_texts(m, texts, lambda b: m.embed_batch(b), m.dim, truncate=True, config=SMALL)
    assert out.shape == (36, 32)


def test_tokenize_range_truncates_keeping_special_tokens():
    m = tiny_model(max_seq_length=8)
    ids = tokenize_range(m.tokenizer, ["a b c d e f g h i j"], 0, 8, True)[0]
    assert len(ids) == 8 and ids[0] == 101 and ids[-1] == 102


def test_classify_is_in_input_order():
    m = tiny_model(num_labels=3)
    got = m.classify(TEXTS)
    want = torch.cat([m.classify_batch(m.tokenize([t])) for t in TEXTS]).numpy()
    assert got.shape == (57, 3) and np.allclose(got, want, atol=1e-5)


def test_a_model_without_tokenizer_says_so_even_for_empty_input():
    m = tiny_model()
    m.tokenizer = None
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m.encode([])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        PipelineConfig(chunk=0)


@pytest.mark.gpu
def test_on_cuda_results_match_cpu_and_come_back_in_order():
    cpu = tiny_model()
    gpu = tiny_model(device="cuda", dtype=torch.float16)
    got = run_texts(gpu, TEXTS, lambda b: gpu.embed_batch(b), gpu.dim, config=SMALL)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    want = one_by_one(cpu, TEXTS)
    assert torch.nn.functional.cosine_similarity(got, want, dim=1).min() >= 0.9995


@pytest.mark.gpu
def test_on_cuda_threads_sharing_a_model_get_what_they_would_alone():
    """Concurrent encode() calls on one GPU model (CUDA graphs and eager batches alike) each get the
    result of a call made alone: the model serializes launches; pipelines overlap around them."""
    from concurrent.futures import ThreadPoolExecutor

    gpu = tiny_model(device="cuda", dtype=torch.float16)
    groups = [TEXTS[k::3] * 4 for k in range(3)]
    for _ in range(2):                  # every batch shape seen twice: its CUDA graph is captured
        alone = [gpu.encode(g) for g in groups]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(gpu.encode, groups * 3))
    # Two calls alone differ by up to ~1.5e-8 (the order of the fp32 pooling sums on the GPU varies); a
    # batch of one call mixed up with another's would be off by ~0.1.
    for got, want in zip(together, alone * 3):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_gpu_default_tokenizes_in_larger_chunks_than_cpu():
    from packformer.pipeline import default_config
    assert default_config(torch.device("cpu")) == PipelineConfig()
    gpu = default_config(torch.device("cuda"))      # a device object needs no GPU to exist
    assert gpu.chunk > PipelineConfig().chunk and gpu.first_chunk >= PipelineConfig().first_chunk


def test_gpu_encode_caps_torch_threads_for_the_call_and_restores_them():
    from packformer.pipeline import HOST_THREADS_ON_GPU, host_threads_for
    cuda = torch.device("cuda")                         # a device object needs no GPU to exist
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with host_threads_for(cuda):
            assert torch.get_num_threads() == HOST_THREADS_ON_GPU
            with host_threads_for(cuda):                     # nested: the outer call restores
                assert torch.get_num_threads() == HOST_THREADS_ON_GPU
            assert torch.get_num_threads() == HOST_THREADS_ON_GPU
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), host_threads_for(cuda):
            raise RuntimeError("a failed call restores too")
        assert torch.get_num_threads() == 2
        with host_threads_for(torch.device("cpu")):         # on CPU the model needs its threads
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _FakeEvent:
    log: list = []

    def record(self):
        _FakeEvent.log.append(("record", id(self)))

    def synchronize(self):
        _FakeEvent.log.append(("sync", id(self)))


def test_pinned_staging_copies_batches_into_reused_slots_after_their_launch_event():
    from packformer.batch import pack
    from packformer.pipeline import _PinnedStaging
    staging = _PinnedStaging(2, event_factory=_FakeEvent, pin=False)
    batches = [pack([[5, 6, 7], [8]], 2), pack([[1, 2]], 2), pack([[9] * 5, [3, 4]], 2)]
    staged = []
    for b in batches:
        s, slot = staging.stage(b)
        assert torch.equal(s.input_ids, b.input_ids) and torch.equal(s.positions, b.positions)
        assert torch.equal(s.cu_seqlens, b.cu_seqlens) and s.cu_seqlens.dtype == torch.int32
        assert s.max_seqlen == b.max_seqlen and s.num_tokens == b.num_tokens
        staging.launched(slot)
        staged.append((slot, s))
    assert [slot for slot, _ in staged] == [0, 1, 0]
    # slot 0 was reused for the third batch only after waiting on the first batch's event
    first_event = _FakeEvent.log[0][1]
    assert ("sync", first_event) in _FakeEvent.log
    assert _FakeEvent.log.index(("sync", first_event)) > _FakeEvent.log.index(("record", first_event))
    assert staged[2][1].input_ids.data_ptr() == staged[0][1].input_ids.data_ptr()   # the same memory
