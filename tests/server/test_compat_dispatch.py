"""TEI's `POST /` runs the route of the served model's kind (in-process: starlette's TestClient runs the
app's lifespan, so the real worker serves): a cross-encoder -> /rerank, a SPLADE model -> /embed_sparse.
The embedding and classifier kinds are checked against real server processes in test_clients.py."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import packformer
from packformer.server import ServerSettings, create_app
from tests.output_folders import splade_folder
from tests.rerank_folders import DOCUMENTS, QUERIES, bert_cross_encoder


def client(model):
    return TestClient(create_app(model, ServerSettings(max_batch_tokens=2048), warm_before_serving=True))


def test_post_root_on_a_cross_encoder_is_rerank(tmp_path):
    ce = packformer.load(bert_cross_encoder(tmp_path / "ce"))
    body = {"query": QUERIES[0], "texts": DOCUMENTS[:3], "return_text": True}
    with client(ce) as c:
        root = c.post("/", json=body)
        assert root.status_code == 200, root.text
        assert root.json() == c.post("/rerank", json=body).json()
        assert {r["text"] for r in root.json()} == set(DOCUMENTS[:3])
        bad = c.post("/", json={"inputs": "an embedding request"})
        assert bad.status_code == 422 and "query: Field required" in bad.json()["error"]


def test_post_root_on_a_splade_model_is_embed_sparse(tmp_path):
    splade = packformer.load(splade_folder(tmp_path / "splade"))
    body = {"inputs": ["alpha beta", "gamma"]}
    with client(splade) as c:
        root = c.post("/", json=body)
        assert root.status_code == 200, root.text
        assert root.json() == c.post("/embed_sparse", json=body).json()
        assert all(set(v) == {"index", "value"} for row in root.json() for v in row)
