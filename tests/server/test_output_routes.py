"""TEI's POST /embed_sparse and POST /embed_all, in-process (starlette's TestClient runs the app's lifespan:
the real worker and scheduler): results equal the model's own encode_sparse / token embeddings, whatever
shares the batch, and bad input gets a clear 4xx body."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

import packformer
from packformer.server import ServerSettings, create_app
from tests.output_folders import TEXTS, bge_m3_folder, splade_folder

MAX_CLIENT_BATCH = 8


@contextmanager
def client(model, **settings):
    settings = dict(dict(max_batch_tokens=512, max_client_batch_size=MAX_CLIENT_BATCH), **settings)
    app = create_app(model, ServerSettings(**settings), warm_before_serving=True)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    return packformer.load(splade_folder(tmp_path_factory.mktemp("splade") / "bert"))


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    return packformer.load(bge_m3_folder(tmp_path_factory.mktemp("m3") / "m3"))


def as_pairs(row: list[dict]) -> tuple[list[int], list[float]]:
    return [d["index"] for d in row], [d["value"] for d in row]


@pytest.mark.parametrize("which", ["splade", "m3"])
def test_embed_sparse_equals_encode_sparse(which, splade, m3):
    model = splade if which == "splade" else m3
    want = model.encode_sparse(TEXTS, convert_to_sparse_tensor=False)
    with client(model) as c:
        r = c.post("/embed_sparse", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        one = c.post("/embed_sparse", json={"inputs": TEXTS[1]}).json()
    got = r.json()
    assert len(got) == len(TEXTS) and len(one) == 1
    for row, ref in zip(got, want):
        ids, vals = as_pairs(row)
        assert ids == sorted(ids) and ids == [i for i, _ in ref]          # TEI: by token id, zeros left out
        np.testing.assert_allclose(vals, [w for _, w in ref], atol=1e-5)
    assert as_pairs(one[0])[0] == as_pairs(got[1])[0]                      # alone == batched
    np.testing.assert_allclose(as_pairs(one[0])[1], as_pairs(got[1])[1], atol=1e-5)


def test_embed_all_equals_token_embeddings(minilm):
    texts = ["The cat sat on the mat.", "a", "packed rows, no padding " * 5]
    want = minilm.encode(texts, output_value="token_embeddings")
    with client(minilm) as c:
        r = c.post("/embed_all", json={"inputs": texts})
    assert r.status_code == 200, r.text
    for got, ref in zip(r.json(), want):
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5


def test_concurrent_mixed_requests_share_batches_and_equal_single_ones(m3):
    """/embed, /embed_sparse and /embed_all requests at once: each answer equals the one it gets alone."""
    import httpx

    alone = {}
    with client(m3) as c:
        for t in TEXTS:
            alone[t] = (c.post("/embed", json={"inputs": t}).json()[0], c.post("/embed_sparse", json={"inputs": t}).json()[0],
                        c.post("/embed_all", json={"inputs": t}).json()[0])
        app = c.app

        async def burst():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
                reqs = [(route, t) for t in TEXTS for route in ("/embed", "/embed_sparse", "/embed_all")] * 3
                rs = await asyncio.gather(*(ac.post(route, json={"inputs": [t]}) for route, t in reqs))
                return list(zip(reqs, rs))

        results = c.portal.call(burst)
    for (route, t), r in results:
        assert r.status_code == 200, r.text
        i = ("/embed", "/embed_sparse", "/embed_all").index(route)
        got, ref = r.json()[0], alone[t][i]
        if route == "/embed_sparse":
            assert as_pairs(got)[0] == as_pairs(ref)[0]
            np.testing.assert_allclose(as_pairs(got)[1], as_pairs(ref)[1], atol=1e-5)
        else:
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("route, body, status, fragment", [
    ("/embed_sparse", {"inputs": []}, 422, "`inputs` is empty"),
    ("/embed_sparse", {"inputs": ["a", ""]}, 422, "`inputs[1]` is empty"),
    ("/embed_sparse", {"inputs": ["a"] * (MAX_CLIENT_BATCH + 1)}, 422, "max-client-batch-size"),
    ("/embed_sparse", {"inputs": 5}, 422, "inputs"),
    ("/embed_sparse", {"inputs": ["a", 3]}, 422, "inputs.list[str].1"),
    ("/embed_sparse", {}, 422, "inputs: Field required"),
    ("/embed_sparse", {"inputs": "ka " * 400, "truncate": False}, 413, "more than the model's maximum"),
    ("/embed_sparse", {"inputs": "a", "truncate": "yes"}, 422, "truncate"),
    ("/embed_sparse", {"inputs": "a", "truncation_direction": "Left"}, 422, "truncation_direction"),
    ("/embed_all", {"inputs": []}, 422, "`inputs` is empty"),
    ("/embed_all", {"inputs": [None]}, 422, "inputs"),
    ("/embed_all", {"inputs": "ka " * 400}, 413, "--auto-truncate"),
])
def test_bad_input_gets_a_clear_error_body(m3, route, body, status, fragment):
    with client(m3) as c:
        r = c.post(route, json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"] and r.json()["error_type"] == "validation"


def test_over_long_input_is_cut_when_asked(m3):
    with client(m3) as c:
        r = c.post("/embed_all", json={"inputs": "ka " * 400, "truncate": True})
        assert r.status_code == 200 and len(r.json()[0]) == m3.max_seq_length
    with client(m3, auto_truncate=True) as c:
        assert c.post("/embed_sparse", json={"inputs": "ka " * 400}).status_code == 200


def test_a_model_without_a_sparse_output_gets_a_422(minilm):
    with client(minilm) as c:
        r = c.post("/embed_sparse", json={"inputs": "hello"})
        assert r.status_code == 422 and "has no sparse output" in r.json()["error"]
        assert "/embed_sparse" in c.get("/openapi.json").json()["paths"]


def test_embed_all_applies_a_prompt_name_and_refuses_an_unknown_one(tmp_path):
    from tests.prompt_folders import st_folder
    model = packformer.load(st_folder(tmp_path / "p", prompts={"query": "query: ", "doc": "passage: "}))
    texts = ["The cat sat on the mat.", "a"]
    want = model.encode(["query: " + t for t in texts], output_value="token_embeddings")
    with client(model) as c:
        r = c.post("/embed_all", json={"inputs": texts, "prompt_name": "query"})
        bad = c.post("/embed_all", json={"inputs": texts, "prompt_name": "nope"})
    assert r.status_code == 200, r.text
    for got, ref in zip(r.json(), want):
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5
    assert bad.status_code == 422 and "nope" in bad.text and "query" in bad.text


def test_embed_sparse_applies_a_prompt_name(splade):
    splade.prompts = {"query": "query: "}          # as a folder's config_sentence_transformers.json gives it
    try:
        want = splade.encode_sparse(["query: " + t for t in TEXTS], convert_to_sparse_tensor=False)
        with client(splade) as c:
            got = c.post("/embed_sparse", json={"inputs": TEXTS, "prompt_name": "query"}).json()
    finally:
        splade.prompts = {}
    for row, ref in zip(got, want):
        ids, vals = as_pairs(row)
        assert ids == [i for i, _ in ref]
        np.testing.assert_allclose(vals, [w for _, w in ref], atol=1e-5)
