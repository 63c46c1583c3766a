"""The rerank workload: one query and passages of the serving length distribution, fixed by its seed; the
benchmark times packformer and CrossEncoder.predict on the same folder and checks their scores agree."""
from __future__ import annotations

import pytest

from packformer.bench.rerank import RERANK_PASSAGES, rerank_workload, run_rerank_bench
from tests.rerank_folders import bert_cross_encoder


def test_rerank_workload_is_fixed_and_follows_the_serving_lengths():
    q, docs = rerank_workload()
    assert (q, docs) == rerank_workload() and len(docs) == RERANK_PASSAGES == 100
    words = sorted(len(d.split()) for d in docs)
    assert 5 <= words[0] and words[-1] <= 509 and 30 <= words[50] <= 100      # median ~64 tokens


def test_run_rerank_bench_reports_ratio_and_agreement(tmp_path):
    pytest.importorskip("sentence_transformers")
    folder = bert_cross_encoder(tmp_path / "ce")
    r = run_rerank_bench(str(folder), passages=6, iterations=1, warmup=0, log=None)
    assert r["agrees"] and r["max_abs_score_diff"] <= 1e-4 and r["top10_order_equal"]
    assert r["passages"] == 6 and r["tokens"] > 6 and r["speedup_of_packformer"] > 0
    assert r["packformer"]["median_ms"] > 0 and r["cross_encoder_fp32"]["batch_size"] == 32


def test_a_non_cross_encoder_is_refused():
    with pytest.raises(ValueError, match="not a cross-encoder"):
        from packformer.loading import builtin_model_dir
        run_rerank_bench(str(builtin_model_dir()), passages=2, iterations=1, warmup=0, log=None)


def test_bench_serve_rerank_drives_the_rerank_route_of_a_real_server(tmp_path):
    import json

    from packformer.cli import main
    folder = bert_cross_encoder(tmp_path / "ce")
    out = tmp_path / "serve.json"
    assert main(["bench-serve", str(folder), "--rerank", "10", "--concurrency", "1", "2", "--requests", "6",
                 "--duration", "20", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "rerank" and r["passages"] == 10 and r["tokens_per_request"] > 10
    assert set(r["levels"]) == {"1", "2"} and r["machine"]["cpu_count"] >= 1
    for level in r["levels"].values():
        assert level["ok"] == level["sent"] >= 6
