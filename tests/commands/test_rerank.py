"""`packformer rerank`: the documents of a cross-encoder folder ranked as CrossEncoder.rank ranks them, from
arguments or a file, as text or JSON, top-k and raw scores; user errors are one line and exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from torch import nn

from packformer.cli import main
from tests.rerank_folders import DOCUMENTS, QUERIES, bert_cross_encoder

CrossEncoder = pytest.importorskip("sentence_transformers").CrossEncoder
DOCS = [d for d in DOCUMENTS if d]          # arguments and file lines: no empty document


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return bert_cross_encoder(tmp_path_factory.mktemp("rerank-cli") / "bert-ce")


@pytest.fixture(scope="module")
def ce(folder):
    return CrossEncoder(str(folder), device="cpu")


def test_json_output_equals_cross_encoder_rank(folder, ce, capsys):
    assert main(["rerank", "--model", str(folder), "--query", QUERIES[0], *DOCS, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = ce.rank(QUERIES[0], DOCS, return_documents=True)
    assert [(g["corpus_id"], g["text"]) for g in got] == [(w["corpus_id"], w["text"]) for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5, rtol=0)


def test_input_file_top_k_and_raw_scores(folder, ce, tmp_path, capsys):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS) + "\n")
    assert main(["rerank", "-m", str(folder), "-q", QUERIES[1], "--input", str(src), "--top-k", "2",
                 "--raw-scores", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = ce.rank(QUERIES[1], DOCS, top_k=2, activation_fn=nn.Identity())
    assert len(got) == 2 and [g["corpus_id"] for g in got] == [w["corpus_id"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5, rtol=0)


def test_text_output_lists_rank_score_index_and_document(folder, ce):
    r = subprocess.run([sys.executable, "-m", "packformer", "rerank", "--model", str(folder), "--query", QUERIES[0],
                        DOCS[0], DOCS[1]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    best = ce.rank(QUERIES[0], DOCS[:2])[0]
    assert len(lines) == 2 and lines[0].split()[0] == "1"
    assert f"[{best['corpus_id']}]" in lines[0] and lines[0].endswith(DOCS[best["corpus_id"]])


def test_user_errors_are_one_line_and_exit_1(folder, capsys):
    assert main(["rerank", "--model", str(folder), "--query", "q"]) == 1
    assert "no texts" in capsys.readouterr().err
    with pytest.raises(SystemExit):            # the parser's own error, before the model loads
        main(["rerank", "--model", str(folder), "--query", "q", "a", "--top-k", "0"])
    assert "argument --top-k: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["rerank", "--query", "q", "a"]) == 1              # the built-in embedding model
    err = capsys.readouterr().err
    assert "is an embedding model; rerank needs a cross-encoder" in err and "Traceback" not in err
    assert main(["rerank", "--model", str(folder), "--query", "q", "word " * 100, "--no-truncate"]) == 1
    assert "more than the model's maximum" in capsys.readouterr().err
