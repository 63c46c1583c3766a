"""SPLADE sparse vectors equal sentence-transformers' SparseEncoder.encode / .decode on the same folders
(random-weight BERT, XLM-R and DistilBERT masked-LM heads; max and sum pooling; relu and log1p_relu;
max_active_dims), whatever else shares the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import packformer
from packformer.sparse import rows_to_coo, top_dims
from tests.output_folders import TEXTS, splade_folder

TOL = 1e-4          # random weights, fp32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("splade")
    return {
        "bert": splade_folder(root / "bert"),
        "bert-sum-log1p": splade_folder(root / "bert_sum", pooling="sum", activation="log1p_relu", seed=1),
        "xlm-roberta": splade_folder(root / "xlmr", kind="xlm-roberta", seed=2),
        "distilbert": splade_folder(root / "distil", kind="distilbert", seed=3),
        "bert-topk": splade_folder(root / "bert_topk", max_active_dims=7, seed=4),
    }


def reference(folder):
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(folder), device="cpu")


@pytest.mark.parametrize("name", ["bert", "bert-sum-log1p", "xlm-roberta", "distilbert", "bert-topk"])
def test_encode_equals_sparse_encoder(folders, name):
    ref = reference(folders[name])
    want = ref.encode(TEXTS, batch_size=3)
    model = packformer.load(folders[name])
    got = model.encode(TEXTS)
    assert got.is_sparse and got.shape == want.shape == (len(TEXTS), ref.get_embedding_dimension() or got.shape[1])
    diff = (got.to_dense() - want.to_dense()).abs().max().item()
    assert diff <= TOL, diff
    # the same nonzero pattern (up to weights within rounding of zero)
    assert ((got.to_dense() > TOL) == (want.to_dense() > TOL)).all()


def test_a_prompt_goes_before_every_text_as_sparse_encoder(folders):
    ref, model = reference(folders["bert"]), packformer.load(folders["bert"])
    want = ref.encode(TEXTS, prompt="query: ")
    for got in (model.encode(TEXTS, prompt="query: "), model.encode_sparse(["query: " + t for t in TEXTS])):
        assert (got.to_dense() - want.to_dense()).abs().max().item() <= TOL


def test_max_active_dims_from_the_folder_and_per_call(folders):
    model = packformer.load(folders["bert-topk"])
    got = model.encode(TEXTS)
    assert (got.to_dense() != 0).sum(dim=1).max().item() == 7
    ref = reference(folders["bert"])
    want = ref.encode(TEXTS, max_active_dims=3)
    got = packformer.load(folders["bert"]).encode(TEXTS, max_active_dims=3)
    assert (got.to_dense() - want.to_dense()).abs().max().item() <= TOL
    assert (got.to_dense() != 0).sum(dim=1).tolist() == [3] * len(TEXTS)


def test_decode_equals_sparse_encoder_decode(folders):
    ref = reference(folders["bert"])
    model = packformer.load(folders["bert"])
    got, want = model.encode(TEXTS), ref.encode(TEXTS)
    for ours, theirs in zip(model.decode(got, top_k=5), ref.decode(want, top_k=5)):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        np.testing.assert_allclose([w for _, w in ours], [w for _, w in theirs], atol=TOL)
    for ours, theirs in zip(model.decode(got), ref.decode(want)):      # all of them (near-ties may swap)
        ours, theirs = dict(ours), dict(theirs)
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose([ours[t] for t in theirs], list(theirs.values()), atol=TOL)
        assert [w for w in ours.values()] == sorted(ours.values(), reverse=True)
    one = model.decode(got[0], top_k=3)
    assert [t for t, _ in one] == [t for t, _ in ref.decode(want[0], top_k=3)]


def test_decode_reads_xlmr_sentencepiece_tokens(folders):
    ref = reference(folders["xlm-roberta"])
    model = packformer.load(folders["xlm-roberta"])
    ours = model.decode(model.encode(TEXTS[0]), top_k=10)
    theirs = ref.decode(ref.encode(TEXTS[0]), top_k=10)
    assert [t for t, _ in ours] == [t for t, _ in theirs]


def test_single_text_gives_one_vector_and_pairs_form(folders):
    model = packformer.load(folders["bert"])
    one = model.encode(TEXTS[1])
    assert one.is_sparse and one.shape == (model.config.vocab_size,)
    pairs = model.encode(TEXTS, convert_to_sparse_tensor=False)
    dense = model.encode(TEXTS).to_dense()
    for i, row in enumerate(pairs):
        ids = [t for t, _ in row]
        assert ids == sorted(ids) and ids == dense[i].nonzero().flatten().tolist()
        np.testing.assert_allclose([w for _, w in row], dense[i, ids].numpy(), rtol=0, atol=0)
    assert model.decode(pairs[0]) == model.decode(dense[0])


def test_a_vector_does_not_depend_on_its_batch(folders):
    model = packformer.load(folders["bert"], max_batch_tokens=128)
    together = model.encode(TEXTS).to_dense()
    for i, t in enumerate(TEXTS):
        alone = model.encode([t]).to_dense()[0]
        assert (alone - together[i]).abs().max().item() <= 1e-5
    shuffled = model.encode(TEXTS[::-1]).to_dense()
    assert (shuffled.flip(0) - together).abs().max().item() <= 1e-5


def test_logits_are_made_in_blocks_of_tokens(folders, monkeypatch):
    """The [T, V] logits never exist whole: blocks of a few tokens give the same vectors."""
    import packformer.sparse as sp

    model = packformer.load(folders["bert-sum-log1p"])
    whole = model.encode(TEXTS).to_dense()
    monkeypatch.setattr(sp, "LOGIT_BLOCK_ELEMENTS", 3 * model.config.vocab_size)    # 3 tokens a block
    assert (model.encode(TEXTS).to_dense() - whole).abs().max().item() <= 1e-5


def test_top_dims_and_coo_helpers():
    v = torch.tensor([[0.0, 3.0, -5.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    assert top_dims(v, 2).tolist() == [[0.0, 3.0, -5.0, 0.0], [2.0, 0.0, 0.0, 0.0]]
    coo = rows_to_coo([(np.array([1, 3]), np.array([0.5, 2.0], np.float32)), (np.zeros(0, np.int64),
                       np.zeros(0, np.float32))], 4)
    assert coo.is_coalesced() and coo.to_dense().tolist() == [[0, 0.5, 0, 2.0], [0, 0, 0, 0]]


def test_bad_arguments_are_named(folders, minilm):
    model = packformer.load(folders["bert"])
    with pytest.raises(ValueError, match="max_active_dims must be a positive integer"):
        model.encode(TEXTS, max_active_dims=0)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.decode(model.encode(TEXTS), top_k=0)
    with pytest.raises(TypeError, match="decode takes a torch tensor"):
        model.decode("abc")
    with pytest.raises(ValueError, match="normalize_embeddings applies to dense"):
        model.encode(TEXTS, normalize_embeddings=True)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        model.encode(["a", 1])
    with pytest.raises(ValueError, match="has no sparse output"):
        minilm.encode_sparse(TEXTS)
    with pytest.raises(ValueError, match="max_active_dims applies to sparse"):
        minilm.encode(TEXTS, max_active_dims=4)
