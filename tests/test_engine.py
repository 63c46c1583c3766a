"""The Model API on the built-in all-MiniLM-L6-v2: parity with sentence-transformers, input order,
batch independence, and clear errors for bad input."""
import numpy as np
import pytest
import torch

import packformer

TEXTS = ["Hello world", "How are you!", "", "The quick brown fox jumps over the lazy dog. " * 3,
         "packed batches never pad", "x", "Über naïve café — unicode ✓", "another " * 40]


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def test_encode_matches_sentence_transformers_within_1e5(minilm, st_model):
    ours = minilm.encode(TEXTS)
    ref = st_model.encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


def test_texts_longer_than_max_seq_length_are_truncated_like_sentence_transformers(minilm, st_model):
    long = ["word " * 600, " ".join(f"tok{i}" for i in range(400))]
    assert max(len(s) for s in minilm.token_ids(long)) == 256
    assert np.abs(minilm.encode(long) - st_model.encode(long)).max() <= 1e-5


def test_unnormalized_embeddings_match_too(minilm, st_model):
    ours = minilm.encode(TEXTS, normalize_embeddings=False)
    ref = st_model.encode(TEXTS, normalize_embeddings=False)   # ST's Normalize module still runs
    assert np.allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-5)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-3)
    assert np.abs(ours / np.linalg.norm(ours, axis=1, keepdims=True) - ref).max() <= 1e-5


def test_a_result_does_not_depend_on_what_shares_its_batch(minilm):
    alone = np.stack([minilm.encode([t])[0] for t in TEXTS])
    together = minilm.encode(TEXTS)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(TEXTS))
    shuffled = minilm.encode([TEXTS[i] for i in perm])
    assert np.abs(alone - together).max() <= 1e-5
    assert np.abs(shuffled - together[perm]).max() <= 1e-5


def test_input_order_is_kept_across_many_chunks(minilm_dir):
    m = packformer.load(minilm_dir, max_batch_tokens=256)      # forces one chunk per few texts
    texts = [("w " * n).strip() for n in [3, 100, 7, 250, 1, 40, 12, 180, 0, 64]]
    small = m.encode(texts, batch_size=2)
    ref = np.stack([m.encode([t])[0] for t in texts])
    assert np.abs(small - ref).max() <= 1e-5


@pytest.mark.parametrize("budget", [0, -5, 255])
def test_a_token_budget_below_one_longest_sequence_is_refused_not_replaced(minilm_dir, budget):
    # 0 included: it is not "the default"
    with pytest.raises(ValueError, match=rf"max_batch_tokens \({budget}\) must hold at least one sequence"):
        packformer.load(minilm_dir, max_batch_tokens=budget)


def test_threads_may_share_a_model_and_get_what_they_would_alone(minilm):
    """Launches are serialized inside the model, so concurrent encode() calls (embed-dataset runs several
    shards per replica) each get exactly the result of a call made alone."""
    from concurrent.futures import ThreadPoolExecutor

    groups = [[f"thread {k} text {i} " + "word " * ((i * 7 + k) % 40) for i in range(40)] for k in range(4)]
    alone = [minilm.encode(g) for g in groups]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(minilm.encode, groups * 2))
    for got, want in zip(together, alone * 2):
        np.testing.assert_array_equal(got, want)


def test_single_string_gives_a_vector_and_empty_list_gives_0_by_d(minilm):
    assert minilm.encode("Hello world").shape == (384,)
    empty = minilm.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert minilm.encode([""]).shape == (1, 384)       # an empty string is a valid input


def test_convert_to_tensor(minilm):
    t = minilm.encode(["a", "b"], convert_to_numpy=False)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 384)


def test_non_string_items_raise_type_error_naming_the_index(minilm):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        minilm.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="texts must be a str or a list of str"):
        minilm.encode(42)


def test_over_long_text_without_truncation_names_index_and_length(minilm):
    with pytest.raises(ValueError, match=r"texts\[1\] has 302 tokens, more than the model's maximum of 256"):
        minilm.encode(["short", "word " * 300], truncate=False)


def test_tokenize_gives_a_packed_batch(minilm):
    b = minilm.tokenize(["Hello world", "How are you!"])
    assert b.cu_seqlens.tolist() == [0, 4, 10] and b.input_ids[0].item() == 101 and b.order.tolist() == [0, 1]
    e = minilm.embed_batch(b)
    assert np.abs(e.numpy() - minilm.encode(["Hello world", "How are you!"])).max() <= 1e-6


def test_bf16_on_cpu_is_opt_in_and_close(minilm_dir):
    m16 = packformer.load(minilm_dir, dtype="bfloat16")
    assert m16.dtype == torch.bfloat16
    a = m16.encode(TEXTS)
    b = packformer.load(minilm_dir).encode(TEXTS)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_classify_without_a_head_is_a_clear_error(minilm):
    with pytest.raises(RuntimeError, match="no classification head"):
        minilm.classify(["x"])


def test_padded_drop_in_returns_padded_hidden_states(minilm):
    ids = minilm.token_ids(["Hello world", "How are you!"])
    L = max(map(len, ids))
    padded = torch.tensor([s + [0] * (L - len(s)) for s in ids])
    out = minilm(padded)
    assert out.shape == (2, L, 384)
    assert torch.count_nonzero(out[0, len(ids[0]):]) == 0
    h = minilm.hidden_states(minilm.pack_ids(ids))
    assert torch.allclose(out[1, : len(ids[1])], h[len(ids[0]):], atol=1e-6)


def test_pack_ids_checks_the_vocabulary_and_length(minilm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        minilm.pack_ids([[101, 99999, 102]])
    with pytest.raises(ValueError, match="more than the model's maximum"):
        minilm.pack_ids([[5] * 300])
    # ids must be integers: a float would be cut to an id without a word
    with pytest.raises(TypeError, match=r"input 1 has token ids of type float64, expected integers: \[101.7"):
        minilm.pack_ids([[101, 102], [101.7, 2000.0, 102]])
    with pytest.raises(TypeError, match="of type bool"):
        minilm.pack_ids([[True, False]])
    # integer arrays and tensors are ids too, and an empty input packs as an empty sequence
    b = minilm.pack_ids([np.array([101, 102], dtype=np.int32), torch.tensor([101, 2000, 102]), []])
    assert b.input_ids.tolist() == [101, 102, 101, 2000, 102] and b.cu_seqlens.tolist() == [0, 2, 5, 5]


def test_fast_takes_a_bool_or_none(minilm_dir):
    with pytest.raises(TypeError, match="fast must be True, False or None"):
        packformer.load(minilm_dir, fast="yes")


def test_random_presets_and_info():
    m = packformer.load("random:minilm-l6")
    info = m.info()
    assert info["layers"] == 6 and info["dim"] == 384 and info["format"] == "random"
    assert info["family"] == "bert"
    assert info["architecture"] == {"norm": "post", "positions": "absolute (learned)", "attention": "global",
                                    "ffn": "MLP (gelu)", "biases": True}
    assert m.encode(["hi"]).shape == (1, 384)
    with pytest.raises(ValueError, match="unknown preset"):
        packformer.load("random:nope")


def test_info_names_the_path_that_runs_and_threads_apply_on_the_reference_path_too(minilm_dir):
    assert packformer.load(minilm_dir, fast=False).info()["runner"] == {"path": "reference"}
    before = torch.get_num_threads()
    try:
        packformer.load(minilm_dir, fast=False, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert packformer.load(minilm_dir).info()["runner"]["path"] != "reference"
