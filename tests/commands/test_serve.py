"""`packformer serve` as a process: overload answers 429 and never hangs; SIGTERM drains the requests in
flight and exits 0; configuration errors are one clear line."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import numpy as np
import pytest

from packformer.cli import main
from packformer.bench.launch import ServerProcess
from packformer.bench.workloads import generate_texts

# requests heavy enough (8 texts of 90-220 words) that several are in flight at once on any machine
LONG_TEXTS = [t for t in generate_texts(6000, seed=5) if len(t.split()) >= 90]
HEAVY = [LONG_TEXTS[i: i + 8] for i in range(0, 8 * 24, 8)]


def _inflight(metrics_text: str) -> float:
    return float(re.search(r"^packformer_inflight_requests ([0-9.e+-]+)$", metrics_text, re.M).group(1))


async def _post_all(url: str, bodies: list[dict], timeout: float = 300.0):
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=len(bodies))) as ac:
        return await asyncio.gather(*(ac.post("/embed", json=b) for b in bodies), return_exceptions=True)


def test_overload_answers_429_and_serves_the_rest(minilm):
    assert len(HEAVY) == 24 and all(len(b) == 8 for b in HEAVY)
    with ServerProcess(["--max-concurrent-requests", "2", "--max-batch-tokens", "4096", "--log-level", "warning"]) as srv:
        responses = asyncio.run(asyncio.wait_for(_post_all(srv.url, [{"inputs": b} for b in HEAVY]), 600))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        for body, r in zip(HEAVY, responses):
            if r.status_code == 429:
                assert r.json()["error_type"] == "overloaded" and "--max-concurrent-requests" in r.json()["error"]
                assert r.headers["retry-after"] == "1"
            else:
                np.testing.assert_allclose(r.json(), minilm.encode(body), atol=1e-5, rtol=0)
        with httpx.Client(base_url=srv.url, timeout=60) as c:          # the slots were all given back
            assert _inflight(c.get("/metrics").text) == 0
            assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
            assert 'packformer_requests_total{route="/embed",status="429"}' in c.get("/metrics").text


def test_sigterm_drains_requests_in_flight_and_exits_0(minilm):
    bodies = [{"inputs": b} for b in HEAVY[:6]]
    srv = ServerProcess(["--max-batch-tokens", "4096", "--log-level", "info"])
    srv.start()
    try:
        async def scenario():
            load = asyncio.ensure_future(_post_all(srv.url, bodies))
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                deadline = time.monotonic() + 120
                while (inflight := _inflight((await ac.get("/metrics")).text)) < 1:
                    assert time.monotonic() < deadline and not load.done(), "load never got in flight"
                    await asyncio.sleep(0.02)
            srv.proc.terminate()                                        # SIGTERM
            refused = False
            # a new connection per request (no keep-alive): new connections are soon refused. A connection
            # that the closing server drops before reading its request (ReadError, RemoteProtocolError) was
            # not accepted either; what the server accepts it answers
            no_keepalive = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=no_keepalive) as late:
                for _ in range(300):
                    try:
                        r = await late.post("/embed", json={"inputs": "late"})
                        assert r.status_code == 200, r.text             # accepted before the socket closed
                    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                        refused = True
                        break
                    await asyncio.sleep(0.1)
            return inflight, refused, await asyncio.wait_for(load, 600)

        inflight, refused, responses = asyncio.run(scenario())
        assert inflight >= 1 and refused
        for body, r in zip(bodies, responses):
            assert not isinstance(r, Exception), repr(r)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json(), minilm.encode(body["inputs"]), atol=1e-5, rtol=0)
        assert srv.proc.wait(120) == 0, srv.log()
        assert "Finished server process" in srv.log()
    finally:
        srv.kill()


def test_bad_limits_are_one_clear_line(capsys):
    assert main(["serve", "--max-batch-tokens", "100"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("packformer serve: error:") and "max_batch_tokens (100)" in err
    # counts and ports out of range stop at the command line, naming the option (argparse: exit 2)
    for flag, value, msg in (("--max-concurrent-requests", "0", "must be at least 1, got 0"),
                             ("--port", "99999", "must be between 0 and 65535, got 99999"),
                             ("--graceful-timeout", "-1", "must be a finite number >= 0, got -1")):
        with pytest.raises(SystemExit) as e:
            main(["serve", flag, value])
        assert e.value.code == 2 and f"argument {flag}: {msg}" in capsys.readouterr().err


@pytest.mark.gpu
def test_serves_on_a_gpu_with_graphs_captured_at_warm_up_and_the_offline_results():
    import packformer

    texts = [t for b in HEAVY[:3] for t in b] + ["short", "a b c", "x"]
    with ServerProcess(["--device", "cuda", "--log-level", "warning"]) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            runner = c.get("/info").json()["runner"]
            assert runner["path"] == "GraphRunner" and runner["graphs"] >= 1, runner   # captured before /health
            one_by_one = [c.post("/embed", json={"inputs": t}).json()[0] for t in texts]
        together = asyncio.run(_post_all(srv.url, [{"inputs": [t]} for t in texts]))
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            assert c.get("/info").json()["runner"]["replays"] >= 1
    want = packformer.load(device="cuda").encode(texts)
    for got in (np.asarray(one_by_one), np.asarray([r.json()[0] for r in together])):
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.9999, cos.min()
