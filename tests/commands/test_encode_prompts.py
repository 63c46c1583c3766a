"""`packformer encode --prompt-name | --prompt | --truncate-dim | --precision`: the rows equal the model's
own encode() with the same arguments; bad values are one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import packformer
from packformer.cli import main
from tests.prompt_folders import st_folder

TEXTS = ["alpha beta", "gamma", "a longer third text"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return st_folder(tmp_path_factory.mktemp("cli_prompts") / "m", {"query": "query: "}, include_prompt=False)


@pytest.fixture(scope="module")
def model(folder):
    return packformer.load(folder)


@pytest.mark.parametrize("flags, kw", [
    (["--prompt-name", "query"], {"prompt_name": "query"}),
    (["--prompt", "search: ", "--truncate-dim", "64"], {"prompt": "search: ", "truncate_dim": 64}),
    (["--precision", "int8"], {"precision": "int8"}),
    (["--precision", "ubinary", "--truncate-dim", "100"], {"precision": "ubinary", "truncate_dim": 100}),
], ids=["prompt-name", "prompt-truncate", "int8", "ubinary"])
def test_encode_flags_equal_model_encode(tmp_path, folder, model, flags, kw):
    out = tmp_path / "o.npy"
    assert main(["encode", "--model", str(folder), *TEXTS, *flags, "--output", str(out)]) == 0
    got, ref = np.load(out), model.encode(TEXTS, **kw)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == np.float32:
        assert np.abs(got - ref).max() <= 1e-6
    else:
        np.testing.assert_array_equal(got, ref)


def test_quantized_json_lines_hold_integers(tmp_path, folder, model):
    out = tmp_path / "o.jsonl"
    assert main(["encode", "--model", str(folder), *TEXTS, "--precision", "binary", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["embedding"] for r in rows] == model.encode(TEXTS, precision="binary").tolist()


@pytest.mark.parametrize("flags, fragment", [
    (["--prompt-name", "nope"], "unknown prompt_name 'nope'; the model's prompts are: 'query'"),
    (["--truncate-dim", "385"], "truncate_dim must be between 1 and the model's embedding dimension 384, got 385"),
])
def test_bad_values_are_one_line_errors(capsys, folder, flags, fragment):
    assert main(["encode", "--model", str(folder), "x", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_bad_precision_and_both_prompts_are_refused_by_the_parser(capsys, folder):
    with pytest.raises(SystemExit):
        main(["encode", "--model", str(folder), "x", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", "--model", str(folder), "x", "--prompt", "a", "--prompt-name", "query"])
    assert "not allowed with argument" in capsys.readouterr().err
