"""Multi-vector outputs: token embeddings equal SentenceTransformer.encode(output_value="token_embeddings")
on the real all-MiniLM-L6-v2; bge-m3's dense, lexical weights and ColBERT vectors from one forward equal
FlagEmbedding's BGEM3FlagModel on a random-weight bge-m3-shaped folder; no result depends on its batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import packformer
from tests.output_folders import TEXTS, bge_m3_folder, bgem3_flag_model

MINILM_TEXTS = ["The cat sat on the mat.", "A", "Packed batches never hold padding tokens, so nothing is masked.",
                "naïve café ünïcode", "short"]


# ---- token embeddings ------------------------------------------------------------------------------
def test_token_embeddings_equal_sentence_transformers_on_real_minilm(minilm_dir, minilm):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_dir), device="cpu")
    want = ref.encode(MINILM_TEXTS, output_value="token_embeddings", batch_size=2)
    got = minilm.encode(MINILM_TEXTS, output_value="token_embeddings")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = w.cpu().numpy() if isinstance(w, torch.Tensor) else w
        assert isinstance(g, np.ndarray) and g.shape == w.shape          # no padding rows
        assert np.abs(g - w).max() <= 1e-5


def test_token_embeddings_forms_and_batch_independence(minilm):
    together = minilm.encode(MINILM_TEXTS, output_value="token_embeddings")
    single = minilm.encode(MINILM_TEXTS[2], output_value="token_embeddings")
    assert single.shape == together[2].shape and np.abs(single - together[2]).max() <= 1e-5
    tensors = minilm.encode(MINILM_TEXTS[:2], output_value="token_embeddings", convert_to_tensor=True)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    for i, t in enumerate(MINILM_TEXTS):
        alone = minilm.encode([t], output_value="token_embeddings")[0]
        assert np.abs(alone - together[i]).max() <= 1e-5
    # mean of a text's token embeddings is its (mean-pooled, then normalized) sentence embedding
    dense = minilm.encode(MINILM_TEXTS)
    mean = np.stack([t.mean(0) for t in together])
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.abs(mean - dense).max() <= 1e-5


def test_token_embeddings_bad_arguments(minilm):
    with pytest.raises(ValueError, match="output_value must be one of"):
        minilm.encode(["a"], output_value="sentence")
    with pytest.raises(ValueError, match="normalize_embeddings applies to dense"):
        minilm.encode(["a"], output_value="token_embeddings", normalize_embeddings=True)
    with pytest.raises(ValueError, match="has no ColBERT output"):
        minilm.encode_all(["a"])
    for kw in ({"truncate_dim": 8}, {"precision": "int8"}):       # dense-only options are refused, not ignored
        with pytest.raises(ValueError, match="apply to dense sentence embeddings"):
            minilm.encode(["a"], output_value="token_embeddings", **kw)


def test_token_embeddings_take_the_prompt_as_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from tests.prompt_folders import st_folder
    folder = st_folder(tmp_path / "p", prompts={"query": "query: "}, default="query")
    ours, st = packformer.load(folder), SentenceTransformer(str(folder), device="cpu")
    for kw in ({}, {"prompt_name": "query"}, {"prompt": "passage: "}):       # {}: the folder's default prompt
        want = st.encode(TEXTS, output_value="token_embeddings", **kw)
        got = ours.encode(TEXTS, output_value="token_embeddings", **kw)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() <= 1e-5, kw


# ---- bge-m3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory):
    return bge_m3_folder(tmp_path_factory.mktemp("bge_m3") / "m3", colbert_dim=24)


@pytest.fixture(scope="module")
def m3(m3_dir):
    return packformer.load(m3_dir)


@pytest.fixture(scope="module")
def m3_reference(m3_dir):
    ref = bgem3_flag_model()(str(m3_dir), use_fp16=False, devices="cpu", colbert_dim=24)
    return ref.encode(TEXTS, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True)


def test_bge_m3_folder_loads_with_its_three_outputs(m3):
    assert m3.format == "bge-m3" and set(m3.outputs) == {"lexical", "colbert"}
    assert m3.pooler.mode == "cls" and m3.pooler.normalize


def test_encode_all_equals_bgem3_flag_model(m3, m3_reference):
    out = m3.encode_all(TEXTS)
    assert out.dense.shape == m3_reference["dense_vecs"].shape
    assert np.abs(out.dense - m3_reference["dense_vecs"]).max() <= 1e-4
    assert np.abs(m3.encode(TEXTS) - out.dense).max() <= 1e-5                  # dense alone: the same vectors
    n_weights = 0
    for ours, theirs in zip(out.sparse, m3_reference["lexical_weights"]):
        theirs = {int(k): float(v) for k, v in theirs.items()}
        assert ours.keys() == theirs.keys()
        n_weights += len(ours)
        assert max((abs(ours[k] - theirs[k]) for k in ours), default=0.0) <= 1e-4
    assert n_weights > len(TEXTS)                 # the folder's weights do give lexical weights
    for ours, theirs in zip(out.colbert, m3_reference["colbert_vecs"]):
        assert ours.shape == theirs.shape and ours.shape[1] == 24          # every token after the first
        assert np.abs(ours - theirs).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_lexical_weights_leave_out_special_tokens(m3):
    ids = m3.token_ids(TEXTS)
    out = m3.encode_all(TEXTS)
    for seq, weights in zip(ids, out.sparse):
        assert not {0, 1, 2, 3} & set(weights)             # <s>, <pad>, </s>, <unk>
        assert set(weights) <= set(seq) and all(w > 0 for w in weights.values())


def test_encode_sparse_gives_the_lexical_weights(m3):
    out = m3.encode_all(TEXTS)
    coo = m3.encode_sparse(TEXTS)
    assert coo.shape == (len(TEXTS), m3.config.vocab_size)
    for i, weights in enumerate(out.sparse):
        row = coo[i].coalesce()
        assert dict(zip(row.indices()[0].tolist(), row.values().tolist())) == pytest.approx(weights)
    assert m3.decode(out.sparse[0])[0][1] == max(out.sparse[0].values())


def test_encode_all_does_not_depend_on_the_batch(m3_dir):
    model = packformer.load(m3_dir, max_batch_tokens=130)           # several batches
    together = model.encode_all(TEXTS)
    for i, t in enumerate(TEXTS):
        alone = model.encode_all(t)
        assert np.abs(alone.dense - together.dense[i]).max() <= 1e-5
        assert alone.sparse.keys() == together.sparse[i].keys()
        assert max((abs(alone.sparse[k] - together.sparse[i][k]) for k in alone.sparse), default=0) <= 1e-5
        assert np.abs(alone.colbert - together.colbert[i]).max() <= 1e-5


def test_bge_m3_bad_linear_files_are_named(tmp_path, m3_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(m3_dir, bad)
    torch.save(torch.nn.Linear(7, 1).state_dict(), bad / "sparse_linear.pt")
    with pytest.raises(ValueError, match=r"sparse_linear.pt: expected weight \[1, 32\]"):
        packformer.load(bad)
    torch.save({"w": torch.zeros(1)}, bad / "sparse_linear.pt")
    with pytest.raises(ValueError, match="expected a Linear state dict"):
        packformer.load(bad)
