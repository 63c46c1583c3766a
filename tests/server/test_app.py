"""The app factory, run in-process by a real uvicorn server on a thread, with a model whose failures we
control: 503 while warming and after the worker died, one failing batch fails only its requests,
body-size limits, metrics, and configuration errors."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn

from packformer.bench.launch import free_port
from packformer.server import ServerSettings, create_app

POISON = 4242


class Controlled:
    """The real model; `gate` holds every batch until set, the POISON id makes a batch raise, and
    `broken` makes every batch raise."""

    def __init__(self, model):
        self._m, self.broken = model, False
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._m, name)

    def embed_batch(self, batch, normalize=None):
        assert self.gate.wait(60), "test gate never opened"
        if self.broken or bool((batch.input_ids == POISON).any()):
            raise RuntimeError("injected failure")
        return self._m.embed_batch(batch, normalize)


@contextmanager
def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(60)


def wait_healthy(client, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("server never became healthy")


SMALL = dict(max_batch_tokens=512)


def test_503_while_warming_up_then_200(minilm):
    model = Controlled(minilm)
    model.gate.clear()                                     # warm-up blocks
    with serving(create_app(model, ServerSettings(**SMALL))) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error_type"] == "unhealthy" and "warming" in r.json()["error"]
        r = client.post("/embed", json={"inputs": "hi"})
        assert r.status_code == 503 and r.json() == {"error": "the model is starting (warming up); retry shortly",
                                                     "error_type": "unhealthy"}
        assert client.get("/info").json()["state"] == "starting"
        model.gate.set()
        wait_healthy(client)
        assert client.post("/embed", json={"inputs": "hi"}).status_code == 200


def test_an_app_that_warms_before_serving_starts_only_once_warm(minilm):
    # what a Ray Serve replica uses: it is routed traffic as soon as the app's startup returns
    model = Controlled(minilm)
    model.gate.clear()                                     # warm-up blocks ...
    threading.Timer(1.0, model.gate.set).start()           # ... for a second
    t0 = time.monotonic()
    with serving(create_app(model, ServerSettings(**SMALL), warm_before_serving=True)) as client:
        assert time.monotonic() - t0 >= 1.0                 # uvicorn's startup waited for the warm-up
        assert client.get("/health").status_code == 200     # the very first request finds it warm
        assert client.post("/embed", json={"inputs": "hi"}).status_code == 200


def test_a_warm_up_that_fails_fails_the_startup_of_an_app_that_waits_for_it(minilm):
    model = Controlled(minilm)
    model.broken = True
    app = create_app(model, ServerSettings(**SMALL), warm_before_serving=True)

    async def startup():
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="worker died while warming up"):
        asyncio.run(startup())


def test_a_failing_batch_fails_only_its_requests(minilm):
    model = Controlled(minilm)
    app = create_app(model, ServerSettings(max_batch_requests=1, **SMALL))   # every input its own batch
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    with serving(app) as client:
        wait_healthy(client)
        base = str(client.base_url)

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=60) as ac:
                good = [ac.post("/embed", json={"inputs": t}) for t in texts]
                bad = ac.post("/v1/embeddings", json={"input": [[2000, POISON, 2001]], "model": "m"})
                return await asyncio.gather(bad, *good)

        bad, *good = asyncio.run(burst())
        assert bad.status_code == 500
        assert bad.json()["error_type"] == "backend" and "injected failure" in bad.json()["error"]
        np.testing.assert_allclose(np.array([r.json()[0] for r in good]), minilm.encode(texts), atol=1e-5, rtol=0)
        assert client.get("/health").status_code == 200                   # still serving
        assert client.post("/embed", json={"inputs": "after"}).status_code == 200
        metrics = client.get("/metrics").text
        assert "packformer_batch_failures_total 1.0" in metrics


def test_503_once_the_worker_died(minilm):
    model = Controlled(minilm)
    with serving(create_app(model, ServerSettings(**SMALL))) as client:
        wait_healthy(client)
        model.broken = True
        r = client.post("/embed", json={"inputs": "this batch fails, then so does the probe"})
        assert r.status_code == 500 and r.json()["error_type"] == "backend"
        deadline = time.monotonic() + 60
        while client.get("/info").json()["state"] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for route, body in [("/embed", {"inputs": "x"}), ("/v1/embeddings", {"input": "x", "model": "m"})]:
            r = client.post(route, json=body)
            assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
            assert "worker died" in r.json()["error"]
        r = client.get("/health")
        assert r.status_code == 503 and "worker died" in r.json()["error"]


def test_body_size_limit_from_content_length_and_from_a_streamed_body(minilm):
    with serving(create_app(minilm, ServerSettings(payload_limit=1000, **SMALL))) as client:
        wait_healthy(client)
        big = {"inputs": "word " * 400}
        r = client.post("/embed", json=big)
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        assert "1000 bytes" in r.json()["error"]

        def chunks():                              # no Content-Length: the limit applies as it streams
            for _ in range(10):
                yield b'{"inputs": "' + b"a" * 150
            yield b'"}'

        r = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        assert client.post("/embed", json={"inputs": "small"}).status_code == 200


def test_metrics_cover_routes_batches_and_queue(minilm):
    with serving(create_app(minilm, ServerSettings(**SMALL))) as client:
        wait_healthy(client)
        client.post("/embed", json={"inputs": ["one", "two"]})
        client.post("/embed", json={"inputs": []})
        text = client.get("/metrics").text
        for name in ["packformer_requests_total", "packformer_request_duration_seconds_bucket",
                     "packformer_queue_duration_seconds_bucket", "packformer_batch_tokens_bucket",
                     "packformer_batch_size_bucket", "packformer_queue_size", "packformer_tokens_per_second",
                     "packformer_tokens_total", "packformer_inflight_requests", "packformer_ready 1.0"]:
            assert name in text, name
        assert 'packformer_requests_total{route="/embed",status="200"} 1.0' in text
        assert 'packformer_requests_total{route="/embed",status="422"} 1.0' in text
        tps = [ln for ln in text.splitlines() if ln.startswith("packformer_tokens_per_second ")]
        assert float(tps[0].split()[1]) > 0


def test_two_apps_in_one_process_keep_separate_metrics(minilm):
    a, b = create_app(minilm, ServerSettings(**SMALL)), create_app(minilm, ServerSettings(**SMALL))
    assert a.state.metrics.registry is not b.state.metrics.registry


def test_configuration_errors_are_clear(minilm):
    with pytest.raises(ValueError, match=r"max_batch_tokens \(100\) must hold at least one input of the model's "
                                         r"maximum length \(256\)"):
        create_app(minilm, ServerSettings(max_batch_tokens=100))
    with pytest.raises(ValueError, match="max_concurrent_requests must be positive"):
        ServerSettings(max_concurrent_requests=0)
    with pytest.raises(ValueError, match="api_key must not be empty"):
        ServerSettings(api_key="")


def test_openapi_documents_every_route(minilm):
    from fastapi.testclient import TestClient

    app = create_app(minilm, ServerSettings(**SMALL))
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    assert set(paths) == {"/embed", "/v1/embeddings", "/embeddings", "/predict", "/tokenize", "/health", "/info",
                          "/metrics", "/embed_sparse", "/embed_all",
                          "/rerank", "/v1/rerank", "/v2/rerank",
                          "/", "/invocations", "/v1/models", "/v1/models/{model_id}"}
    assert "422" in paths["/embed"]["post"]["responses"] and "429" in paths["/v1/embeddings"]["post"]["responses"]
