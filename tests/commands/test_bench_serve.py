"""`packformer bench-serve`: ratios and table from results, and (slow) a tiny end-to-end run."""
from __future__ import annotations

import json

import pytest

from packformer.cli import main
from packformer.commands.bench_serve import ratios, table


def _level(tps, p50=10.0, p99=20.0):
    return {"tokens_per_s": tps, "p50_ms": p50, "p99_ms": p99}


def test_ratios_compare_serve_with_offline_and_baseline_per_level():
    res = {"offline_encode": {"tokens_per_s": 1000.0},
           "serve": {"1": _level(500.0), "64": _level(900.0)},
           "baseline": {"1": _level(250.0), "64": _level(300.0)}}
    assert ratios(res) == {"1": {"serve_vs_offline_encode": 0.5, "serve_vs_baseline": 2.0},
                           "64": {"serve_vs_offline_encode": 0.9, "serve_vs_baseline": 3.0}}
    res["ratios"] = ratios(res)
    t = table(res)
    assert "| 64 | 900 | 10.0 | 20.0 | 300 | 10.0 / 20.0 | 3.0 | 0.9 | – |" in t
    assert "offline packformer encode(): 1,000 tokens/s" in t


def test_ratios_without_peers_are_empty():
    res = {"serve": {"8": _level(100.0)}}
    res["ratios"] = ratios(res)
    assert res["ratios"] == {"8": {}}
    assert "| 8 | 100 | 10.0 | 20.0 | – | – | – | – | – |" in table(res)


def test_cpu_efficiency_ratio_when_both_servers_were_measured():
    res = {"serve": {"1": {**_level(500.0), "tokens_per_server_cpu_s": 900.0}},
           "baseline": {"1": {**_level(250.0), "tokens_per_server_cpu_s": 300.0}}}
    assert ratios(res)["1"]["serve_vs_baseline_per_cpu_s"] == 3.0


def test_process_cpu_seconds_of_this_process_grows():
    import os
    from packformer.commands.bench_serve import process_cpu_seconds
    a = process_cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))
    b = process_cpu_seconds(os.getpid())
    assert a is not None and b > a
    assert process_cpu_seconds(2 ** 22 + 12345) is None


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--requests", "6", "--concurrency", "1", "2", "--duration", "60",
                 "--max-batch-tokens", "4096", "--output", str(out), "--note", "test"]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["cpu_count"] >= 1 and res["note"] == "test"
    for side in ("serve", "baseline"):
        assert set(res[side]) == {"1", "2"}
        assert all(r["ok"] == r["sent"] == 6 and r["tokens_per_s"] > 0 for r in res[side].values())
    assert res["offline_encode"]["tokens_per_s"] > 0 and res["offline_sentence_transformers"]["tokens_per_s"] > 0
    assert set(res["ratios"]["2"]) == {"serve_vs_offline_encode", "serve_vs_baseline", "serve_vs_baseline_per_cpu_s"}
    assert res["serve"]["2"]["tokens_per_server_cpu_s"] > 0
