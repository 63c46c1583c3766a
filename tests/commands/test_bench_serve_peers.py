"""`packformer bench-serve --peer infinity`: Infinity's server is started on the same model folder, checked
against packformer's embeddings, driven by the same load generator and recorded next to packformer serve."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from packformer.bench import peer_infinity
from packformer.bench.serve_peers import SERVERS, PeerServer, min_cosine
from packformer.cli import main
from packformer.commands.bench_serve import ratios, table


def _level(tps, p50=10.0, p99=20.0, cpu=None):
    d = {"tokens_per_s": tps, "p50_ms": p50, "p99_ms": p99}
    if cpu:
        d["tokens_per_server_cpu_s"] = cpu
    return d


def test_infinity_is_recorded_side_by_side_with_its_own_ratios():
    res = {"serve": {"1": _level(500.0, cpu=1000.0), "8": _level(900.0)},
           "baseline": {"1": _level(250.0)},
           "infinity": {"1": _level(200.0, 30.0, 80.0, cpu=250.0), "8": _level(450.0)}}
    res["ratios"] = ratios(res)
    assert res["ratios"]["1"] == {"serve_vs_baseline": 2.0, "serve_vs_infinity": 2.5, "serve_vs_infinity_per_cpu_s": 4.0}
    assert res["ratios"]["8"] == {"serve_vs_infinity": 2.0}
    t = table(res)
    assert "| 1 | 500 | 200 | 30.0 / 80.0 | 2.5 | 4.0 |" in t and "| 8 | 900 | 450 | 10.0 / 20.0 | 2.0 | – |" in t


def test_without_infinity_there_is_no_infinity_table():
    res = {"serve": {"1": _level(500.0)}}
    res["ratios"] = ratios(res)
    assert "Infinity" not in table(res)


def test_the_infinity_server_is_started_on_the_folder_with_the_models_pooling(monkeypatch, tmp_path):
    exe = tmp_path / "infinity_emb"
    exe.write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))      # infinity_emb beside the interpreter
    peer = SERVERS["infinity"]("/models/minilm", "cpu", "mean", "float32")
    cmd = peer.command
    assert cmd[:2] == [str(exe), "v2"]
    for name, value in [("--model-id", "/models/minilm"), ("--engine", "torch"), ("--device", "cpu"),
                        ("--pooling-method", "mean"), ("--dtype", "float32")]:
        assert cmd[cmd.index(name) + 1] == value
    assert "--no-compile" in cmd and "--host" not in cmd and "--port" not in cmd   # ServerProcess adds them
    assert peer.route == "/embeddings" and peer.env["DO_NOT_TRACK"] == "1" and peer.env["HF_HUB_OFFLINE"] == "1"
    assert peer.body(["a", "b"]) == {"input": ["a", "b"], "model": peer_infinity.SERVED_NAME}


def test_a_missing_infinity_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(peer_infinity.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r'pip install -e "\.\[peers\]"'):
        SERVERS["infinity"]("/models/minilm", "cpu", "mean", "float32")


def test_answers_are_read_in_input_order_and_compared_by_cosine():
    p = PeerServer("x", "x", [], "/embeddings", lambda t: {})
    answer = {"data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [3.0, 0.0]}]}
    got = p.embeddings(answer)
    np.testing.assert_array_equal(got, [[3.0, 0.0], [0.0, 2.0]])
    assert min_cosine(got, np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert min_cosine(got, np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("infinity_emb") is None,
                    reason='infinity_emb not installed: pip install -e ".[peers]"')
def test_bench_serve_drives_infinity_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--requests", "6", "--concurrency", "1", "2", "--no-baseline", "--no-offline",
                 "--peer", "infinity", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["infinity_agreement"]["min_cosine"] >= 0.9999
    assert all(r["ok"] == r["sent"] == 6 and r["tokens_per_s"] > 0 for r in res["infinity"].values())
    assert {"serve_vs_infinity"} <= set(res["ratios"]["2"]) and res["infinity_command"][1] == "v2"
