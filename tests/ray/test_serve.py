"""The Ray Serve deployment answers like the single-process server: the same /v1/embeddings and /embed
results, the same errors, correct answers under concurrent load on 2 replicas; and
`packformer serve --ray` starts, answers and shuts down on SIGTERM.

Real HTTP clients against Serve's localhost port and against the single-process app (uvicorn on a
thread), both serving the built-in all-MiniLM-L6-v2. Ray is an optional extra: skipped without it.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
pytest.importorskip("ray.serve", reason='Ray Serve is missing: pip install -e ".[ray]"')
import uvicorn  # noqa: E402

from packformer.server import ServerSettings, create_app  # noqa: E402
from packformer.server.formats import from_base64  # noqa: E402
from packformer.bench.launch import ServerProcess, free_port  # noqa: E402

SETTINGS = dict(max_batch_tokens=2048, max_client_batch_size=8)


def texts(n: int, offset: int = 0) -> list[str]:
    words = "river model token batch packed padding engine layer vector query answer city".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5) % 40)) for i in range(offset, offset + n)]


# ---- the CLI (its own local Ray, in a subprocess) --------------------------------------------------
def test_cli_serve_ray_answers_and_stops_on_sigterm(minilm):
    """Through the HAProxy ingress (requests go straight to the replica's own port); the default proxy
    ingress is what the deployment tests below run."""
    with ServerProcess(["--ray", "--ingress", "haproxy", "--replicas", "1", "--max-batch-tokens", "2048"],
                       startup_timeout=300) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": ["hello world"]}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], minilm.encode(["hello world"])[0], atol=1e-5)
        code = srv.terminate(timeout=120)
        assert code == 0, srv.log()[-3000:]


def test_cli_serve_ray_gives_the_replicas_its_task(monkeypatch):
    """`serve --ray --task T` loads every replica with T as the task of requests that name none (models
    with task adapters), as `serve --task T` does in one process."""
    from packformer.cli import main
    from packformer.ray import serve as ray_serve

    got = {}
    monkeypatch.setattr(ray_serve, "serve_forever", lambda model, settings, **kw: got.update(kw) or 0)
    assert main(["serve", "--ray", "--task", "retrieval.query", "--replicas", "2"]) == 0
    assert got["task"] == "retrieval.query" and got["replicas"] == 2
    with pytest.raises(ValueError, match="a model factory loads its own task"):
        ray_serve.start(lambda: None, task="retrieval.query")


def test_cli_haproxy_ingress_cannot_be_set_on_a_joined_cluster(capsys):
    from packformer.cli import main

    assert main(["serve", "--ray", "--ingress", "haproxy", "--ray-address", "auto"]) == 1
    assert "--ingress haproxy starts its own local Ray" in capsys.readouterr().err


# ---- the deployment, against the single-process server ----------------------------------------------
@pytest.fixture(scope="module")
def serve_url():
    from packformer.ray import serve as ray_serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        url = ray_serve.start(None, ServerSettings(**SETTINGS), replicas=2, port=free_port())
        ray_serve.wait_healthy(url)
        yield url
    finally:
        ray_serve.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_url(minilm):
    """The single-process server (packformer serve) on a thread, same model and settings."""
    app = create_app(minilm, ServerSettings(**SETTINGS))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "local server did not become healthy"
        time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(60)


def test_wait_healthy_needs_no_http_client_package(local_url, monkeypatch):
    """`packformer serve --ray` waits for /health with the standard library: the ray extra alone
    (no dev extra, so no httpx) must serve."""
    from packformer.ray import serve as ray_serve

    monkeypatch.setitem(sys.modules, "httpx", None)          # as if only .[ray] were installed
    ray_serve.wait_healthy(local_url, timeout=30)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"/health not 200 within 1 s \(last: .*Connection refused"):
        ray_serve.wait_healthy(f"http://127.0.0.1:{free_port()}", timeout=1)
    assert time.monotonic() - t0 < 10


@contextmanager
def clients(*urls):
    cs = [httpx.Client(base_url=u, timeout=120) for u in urls]
    try:
        yield cs
    finally:
        for c in cs:
            c.close()


def test_two_replicas_are_running(serve_url):
    status = ray.serve.status().applications["packformer"]
    assert status.status == "RUNNING"
    assert status.deployments["PackformerReplica"].replica_states == {"RUNNING": 2}


@pytest.mark.parametrize("body", [
    {"input": "one text"},
    {"input": texts(6)},
    {"input": texts(3), "model": "x", "encoding_format": "base64"},
    {"input": texts(2), "dimensions": 64},
    {"input": [[2023, 2003, 1037, 3231], [7592]]},           # token ids, no special tokens
])
def test_v1_embeddings_equal_the_single_process_server(serve_url, local_url, body):
    with clients(serve_url, local_url) as (ray_c, local_c):
        a, b = ray_c.post("/v1/embeddings", json=body), local_c.post("/v1/embeddings", json=body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ja, jb = a.json(), b.json()
    assert {k: v for k, v in ja.items() if k != "data"} == {k: v for k, v in jb.items() if k != "data"}
    assert [d["index"] for d in ja["data"]] == [d["index"] for d in jb["data"]]

    def vecs(j):
        return np.stack([from_base64(d["embedding"]) if isinstance(d["embedding"], str) else np.asarray(d["embedding"])
                         for d in j["data"]])
    np.testing.assert_allclose(vecs(ja), vecs(jb), atol=1e-5)


def test_tei_embed_equals_the_single_process_server(serve_url, local_url):
    body = {"inputs": texts(4, offset=9), "normalize": False}
    with clients(serve_url, local_url) as (ray_c, local_c):
        a, b = ray_c.post("/embed", json=body), local_c.post("/embed", json=body)
    assert a.status_code == b.status_code == 200
    np.testing.assert_allclose(np.asarray(a.json()), np.asarray(b.json()), atol=1e-5)


@pytest.mark.parametrize("body", [
    {"input": []},
    {"input": texts(9)},                   # more than max_client_batch_size
    {"input": 5},
    {"input": [[10**9]]},                  # an id outside the vocabulary
])
def test_errors_equal_the_single_process_server(serve_url, local_url, body):
    with clients(serve_url, local_url) as (ray_c, local_c):
        a, b = ray_c.post("/v1/embeddings", json=body), local_c.post("/v1/embeddings", json=body)
    assert a.status_code == b.status_code and a.status_code in (413, 422)
    assert a.json() == b.json()


def test_concurrent_requests_over_replicas_each_equal_encode(serve_url, minilm):
    """48 requests at once, each its own texts: every answer equals Model.encode of its own inputs,
    whatever shared its batch in whichever replica."""
    bodies = [texts(1 + i % 4, offset=i * 4) for i in range(48)]

    async def fire():
        async with httpx.AsyncClient(base_url=serve_url, timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/embeddings", json={"input": b}) for b in bodies))

    answers = asyncio.run(fire())
    assert [r.status_code for r in answers] == [200] * len(bodies)
    got = np.concatenate([np.asarray([d["embedding"] for d in r.json()["data"]]) for r in answers])
    ref = minilm.encode([t for b in bodies for t in b])
    np.testing.assert_allclose(got, ref, atol=1e-5)
