"""The bench-serve load generator: bounded in requests and in time, counts tokens of successes only,
tallies errors by status."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import numpy as np
import uvicorn
from fastapi import FastAPI, Response

from packformer.bench.launch import free_port
from packformer.bench.loadgen import LevelResult, run_level


@contextmanager
def toy_server(delay_s: float = 0.0):
    app = FastAPI()
    seen = []

    @app.post("/embed")
    async def embed(body: dict):
        seen.append(body["i"])
        if delay_s:
            await asyncio.sleep(delay_s)
        return Response("[]", 429 if body["i"] % 3 == 0 else 200)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/embed", seen
    finally:
        server.should_exit = True
        t.join(30)


def test_counts_requests_tokens_and_errors():
    payloads = [{"i": i} for i in range(10)]
    tokens = [10 * i for i in range(10)]
    with toy_server() as (url, seen):
        r = run_level(url, payloads, tokens, concurrency=4, max_requests=25, duration_s=60)
    assert r.sent == 25 and len(seen) == 25
    statuses = [429 if i % 3 == 0 else 200 for i in (k % 10 for k in range(25))]
    assert r.ok == statuses.count(200) and r.errors == {"429": statuses.count(429)}
    assert r.tokens == sum(tokens[k % 10] for k in range(25) if statuses[k] == 200)
    assert len(r.latencies_ms) == r.ok and r.tokens_per_s > 0
    s = r.summary()
    assert s["p50_ms"] <= s["p99_ms"] and "latencies_ms" not in s


def test_a_level_stops_at_its_duration():
    with toy_server(delay_s=0.2) as (url, seen):
        r = run_level(url, [{"i": 1}], [5], concurrency=2, max_requests=10_000, duration_s=0.5)
    assert r.sent < 10_000 and r.sent == len(seen)


def test_unreachable_server_is_an_error_not_a_hang():
    r = run_level(f"http://127.0.0.1:{free_port()}/embed", [{"i": 1}], [5], concurrency=2, max_requests=4,
                  duration_s=30, timeout_s=10)
    assert r.ok == 0 and sum(r.errors.values()) == 4
    assert np.isnan(r.percentile_ms(50))


def test_empty_result_summary():
    assert LevelResult(1, 0, 0, 0, 0.0).tokens_per_s == 0.0
