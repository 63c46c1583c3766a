"""The sparse and bge_m3 bench workloads: a tiny smoke through `packformer bench` that checks results
against SparseEncoder / FlagEmbedding and reports the ratios."""
from __future__ import annotations

import json

from packformer.cli import main
from tests.output_folders import TEXTS, bge_m3_folder, splade_folder


def test_sparse_and_bge_m3_workloads_run_and_agree(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 3))
    splade = splade_folder(tmp_path / "splade")
    common = ["--texts", str(texts), "--iterations", "1", "--warmup", "0", "--json"]
    assert main(["bench", str(splade), "--workloads", "sparse", *common]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["workload"] == "sparse" and r["agrees"] and r["max_abs_diff"] <= 1e-4
    assert [x["name"] for x in r["results"]] == ["packformer", "sentence-transformers"]
    m3 = bge_m3_folder(tmp_path / "m3")
    assert main(["bench", str(m3), "--workloads", "bge_m3", *common]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["agrees"] and r["same_token_ids"] and r["all_over_dense"] > 0 and r["speedup"] > 0
    assert [x["name"] for x in r["results"]] == ["packformer dense", "packformer encode_all",
                                                 "FlagEmbedding BGEM3FlagModel"]
    assert main(["bench", "--workloads", "bge_m3", *common]) == 1            # needs a folder: one-line error
    assert "needs a bge-m3 folder" in capsys.readouterr().err


def test_bench_serve_sparse_drives_embed_sparse_of_a_real_server(tmp_path):
    splade = splade_folder(tmp_path / "splade")
    out = tmp_path / "serve.json"
    assert main(["bench-serve", str(splade), "--sparse", "--concurrency", "1", "4", "--requests", "12",
                 "--num-texts", "20", "--duration", "20", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "embed_sparse" and set(r["levels"]) == {"1", "4"} and r["machine"]["cpu_count"] >= 1
    for level in r["levels"].values():
        assert level["ok"] == level["sent"] >= 12 and level["tokens_per_s"] > 0
