"""Device/dtype resolution and token-budget chunking."""
import pytest
import torch

from packformer.runtime import plan_chunks, resolve_device, resolve_dtype


def test_chunks_respect_the_token_budget_and_cover_every_index_once():
    lengths = [5, 300, 17, 17, 120, 9, 64, 200, 1, 33]
    chunks = plan_chunks(lengths, max_batch_tokens=320)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in c) <= 320 for c in chunks)
    # length-sorted: longest first
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_a_sequence_longer_than_the_budget_gets_a_chunk_of_its_own():
    assert plan_chunks([10, 500, 10], max_batch_tokens=100) == [[1], [0, 2]]


def test_batch_size_caps_sequences_per_chunk():
    assert all(len(c) <= 2 for c in plan_chunks([3] * 7, max_batch_tokens=1000, max_batch_size=2))


def test_defaults_and_errors():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int4", cpu)
    with pytest.raises(ValueError, match="positive"):
        plan_chunks([1], 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error_at_load_time():
    import packformer

    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        packformer.load("random:minilm-l6", device="cuda")
