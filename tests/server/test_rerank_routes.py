"""The rerank routes of `packformer serve` on a cross-encoder, against a real server process: the official
Cohere clients (v1 and v2) and httpx give CrossEncoder.rank's order and scores; TEI /rerank's sigmoid and raw
scores; a rerank is one scheduler entry per pair; the bad-input matrix; embedding routes on a reranker and
/rerank on an embedder answer 422 naming what the model is; overload answers 429."""
from __future__ import annotations

import asyncio

import cohere
import httpx
import numpy as np
import pytest
from torch import nn

import packformer
from packformer.bench.launch import ServerProcess
from tests.rerank_folders import DOCUMENTS, MAX_LENGTH, QUERIES, bert_cross_encoder

CrossEncoder = pytest.importorskip("sentence_transformers").CrossEncoder
MAX_CLIENT_BATCH = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return bert_cross_encoder(tmp_path_factory.mktemp("rerank-serve") / "bert-ce")


@pytest.fixture(scope="module")
def ce(folder):
    return CrossEncoder(str(folder), device="cpu")


@pytest.fixture(scope="module")
def server(folder):
    args = [str(folder), "--max-batch-tokens", "512", "--max-client-batch-size", str(MAX_CLIENT_BATCH),
            "--payload-limit", "20000", "--log-level", "warning"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=atol, rtol=0)


# ---- official clients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("top_n", [None, 3])
def test_cohere_v2_client_equals_cross_encoder_rank(server, ce, top_n):
    client = cohere.ClientV2(base_url=server.url, api_key="x", timeout=60)
    kw = {} if top_n is None else {"top_n": top_n}
    r = client.rerank(model="bert-ce", query=QUERIES[0], documents=DOCUMENTS, **kw)
    want = ce.rank(QUERIES[0], DOCUMENTS, top_k=top_n)
    assert [x.index for x in r.results] == [w["corpus_id"] for w in want]
    close([x.relevance_score for x in r.results], [w["score"] for w in want])
    assert r.meta.api_version.version == "2" and r.meta.billed_units.search_units == 1
    assert r.meta.tokens.input_tokens == sum(map(len, packformer.load(server.args[0]).pair_ids(
        [(QUERIES[0], d) for d in DOCUMENTS])))


def test_cohere_v1_client_returns_documents(server, ce):
    client = cohere.Client(base_url=server.url, api_key="x", timeout=60)
    docs = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, DOCUMENTS[4]]
    r = client.rerank(query=QUERIES[1], documents=docs, return_documents=True, top_n=2)
    texts = [DOCUMENTS[0], DOCUMENTS[1], DOCUMENTS[4]]
    want = ce.rank(QUERIES[1], texts, top_k=2, return_documents=True)
    assert [(x.index, x.document.text) for x in r.results] == [(w["corpus_id"], w["text"]) for w in want]
    close([x.relevance_score for x in r.results], [w["score"] for w in want])


# ---- TEI /rerank and /v1/rerank over httpx ------------------------------------------------------------------
def test_tei_rerank_sorted_sigmoid_scores_raw_scores_and_text(http, ce):
    pairs = [(QUERIES[2], d) for d in DOCUMENTS]
    logits = ce.predict(pairs, activation_fn=nn.Identity())
    r = http.post("/rerank", json={"query": QUERIES[2], "texts": DOCUMENTS, "return_text": True,
                                   "truncate": True})
    assert r.status_code == 200
    got = r.json()
    assert [g["index"] for g in got] == list(np.argsort(-logits, kind="stable"))
    close([g["score"] for g in got], 1 / (1 + np.exp(-logits[[g["index"] for g in got]])))
    assert [g["text"] for g in got] == [DOCUMENTS[g["index"]] for g in got]
    raw = http.post("/rerank", json={"query": QUERIES[2], "texts": DOCUMENTS, "raw_scores": True,
                                     "truncate": True}).json()
    close([g["score"] for g in raw], logits[[g["index"] for g in raw]])
    assert all("text" not in g for g in raw)


def test_v1_rerank_over_httpx_has_usage_and_model(http, ce):
    r = http.post("/v1/rerank", json={"model": "x", "query": QUERIES[0], "documents": DOCUMENTS}).json()
    want = ce.rank(QUERIES[0], DOCUMENTS)
    assert [x["index"] for x in r["results"]] == [w["corpus_id"] for w in want]
    assert r["model"] == "bert-ce" and r["usage"]["total_tokens"] > 0 and "document" not in r["results"][0]


def test_over_long_documents_are_cut_as_cross_encoder_cuts_them(http, ce):
    long_docs = ["to mi re su no " * 30, "ka " * 200]
    r = http.post("/rerank", json={"query": QUERIES[3], "texts": long_docs, "truncate": True, "raw_scores": True})
    got = sorted(r.json(), key=lambda g: g["index"])
    close([g["score"] for g in got], ce.predict([(QUERIES[3], d) for d in long_docs], activation_fn=nn.Identity()))


def test_concurrent_reranks_pack_together_and_score_as_alone(server, ce):
    """Many reranks at once share packed batches (512-token budget); each answer equals its own rank()."""
    queries = [QUERIES[i % len(QUERIES)] for i in range(12)]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/rerank", json={"query": q, "texts": DOCUMENTS,
                                                                        "raw_scores": True, "truncate": True})
                                          for q in queries))
    for q, r in zip(queries, asyncio.run(go())):
        got = sorted(r.json(), key=lambda g: g["index"])
        close([g["score"] for g in got], ce.predict([(q, d) for d in DOCUMENTS], activation_fn=nn.Identity()))
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/rerank"' in metrics


def test_info_says_reranker(http):
    info = http.get("/info").json()
    assert info["model_type"] == "reranker" and info["max_input_length"] == MAX_LENGTH and "dim" in info


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route, body, status, msg", [
    ("/rerank", {"query": "", "texts": ["a"]}, 422, "`query` is empty"),
    ("/rerank", {"query": "q", "texts": []}, 422, "`texts` is empty: give at least one document"),
    ("/rerank", {"query": "q", "texts": "a"}, 422, "texts"),
    ("/rerank", {"query": 3, "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": [1]}, 422, "texts"),
    ("/rerank", {"texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": ["a"] * (MAX_CLIENT_BATCH + 1)}, 422, "--max-client-batch-size"),
    ("/rerank", {"query": "q", "texts": ["a", "word " * 100], "truncate": False}, 413,
     rf"texts\[1\] has \d+ tokens, more than the model's maximum of {MAX_LENGTH}"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["word " * 4000]}, 413, ""),          # over --payload-limit
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
    ("/v2/rerank", {"query": "q", "documents": [{"title": "a"}]}, 422, "documents"),
    ("/v2/rerank", {"query": "q", "documents": []}, 422, "`documents` is empty: give at least one document"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 5}, 422, "max_tokens_per_doc"),
    ("/embed", {"inputs": "a"}, 422, "is a reranker"),
    ("/v1/embeddings", {"input": "a", "model": "m"}, 422, "is a reranker"),
    # a lone surrogate escaped in the JSON (bytes: sent as they are)
    ("/rerank", b'{"query": "q\\ud800", "texts": ["a"]}', 422, r"`query` holds .* at position 1: a lone surrogate"),
    ("/v2/rerank", b'{"query": "q", "documents": ["a", "\\udc00"]}', 422, r"`documents\[1\]` holds .*lone surrogate"),
])
def test_bad_requests_get_clear_errors(http, route, body, status, msg):
    r = (http.post(route, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
         else http.post(route, json=body))
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == "validation"
    assert __import__("re").search(msg, r.json()["error"]), r.json()["error"]


def test_rerank_on_an_embedding_server_names_the_model_kind():
    with ServerProcess(["--log-level", "warning"]) as srv:
        for route, body in (("/rerank", {"query": "q", "texts": ["a"]}), ("/v2/rerank", {"query": "q", "documents": ["a"]})):
            r = httpx.post(srv.url + route, json=body, timeout=60)
            assert r.status_code == 422 and "is an embedding model: reranking needs a cross-encoder" in r.json()["error"]


def test_overload_answers_429(folder):
    texts = ["to mi re su no " * 30] * MAX_CLIENT_BATCH
    with ServerProcess([str(folder), "--max-concurrent-requests", "1", "--max-batch-tokens", "512",
                        "--max-client-batch-size", str(MAX_CLIENT_BATCH), "--log-level", "warning"]) as srv:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                return await asyncio.gather(*(ac.post("/rerank", json={"query": "q " * 20, "texts": texts,
                                                                        "truncate": True}) for _ in range(16)))
        statuses = [r.status_code for r in asyncio.run(go())]
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
