"""`packformer encode --sparse | --token-embeddings`: JSON lines equal to the model's own outputs; a SPLADE
folder gives sparse vectors without the flag; misuse is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest

import packformer
from packformer.cli import main
from tests.output_folders import splade_folder

TEXTS = ["alpha beta", "gamma"]


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory):
    return splade_folder(tmp_path_factory.mktemp("cli_splade") / "bert")


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_token_embeddings_as_json_lines(tmp_path, minilm):
    assert main(["encode", "--token-embeddings", "-o", str(tmp_path / "t.jsonl"), *TEXTS]) == 0
    rows = lines(tmp_path / "t.jsonl")
    want = minilm.encode(TEXTS, output_value="token_embeddings")
    assert [r["text"] for r in rows] == TEXTS
    for r, w in zip(rows, want):
        assert np.abs(np.asarray(r["token_embeddings"]) - w).max() <= 1e-6


@pytest.mark.parametrize("flag", [["--sparse"], []])
def test_sparse_vectors_as_json_lines(tmp_path, splade_dir, flag):
    out = tmp_path / "s.jsonl"
    assert main(["encode", "--model", str(splade_dir), *flag, "-o", str(out), *TEXTS]) == 0
    want = packformer.load(splade_dir).encode(TEXTS, convert_to_sparse_tensor=False)
    for r, w in zip(lines(out), want):
        assert [i for i, _ in r["sparse"]] == [i for i, _ in w]
        np.testing.assert_allclose([v for _, v in r["sparse"]], [v for _, v in w], atol=1e-6)


def test_misuse_is_a_one_line_error(tmp_path, splade_dir, capsys):
    assert main(["encode", "--sparse", "x"]) == 1                         # the built-in model is dense
    assert "has no sparse output" in capsys.readouterr().err
    assert main(["encode", "--token-embeddings", "-o", str(tmp_path / "t.npy"), "x"]) == 1
    assert "--output must end in .jsonl" in capsys.readouterr().err
    assert main(["encode", "--model", str(splade_dir), "--normalize", "x"]) == 1
    err = capsys.readouterr().err
    assert "--normalize applies to dense" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["encode", "--sparse", "--token-embeddings", "x"])           # one or the other
