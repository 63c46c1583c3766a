"""Input shards and output files of embed-dataset (pyarrow only: no Ray, no model)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="packformer.ray needs pyarrow: pip install -e '.[ray]'")
import pyarrow.parquet as pq  # noqa: E402

from packformer.ray.shards import (EMBEDDING_COLUMN, InputError, Shard, complete_rows, list_inputs,  # noqa: E402
                                   output_table, plan_file, read_shard, resolve, write_atomic)


def write_jsonl(path, records, blank_every=0, trailing_newline=True):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("   ")           # blank and whitespace lines are not records
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(text, encoding="utf-8")


def all_shards(path, rows_per_shard, fmt):
    fs, files = list_inputs(str(path))
    return fs, [s for p, k, f in files for s in plan_file(fs, p, k, f, rows_per_shard, ("id", "text"))]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_jsonl_shards_cover_every_record_once_in_order(tmp_path, trailing_newline):
    records = [{"id": i, "text": f"text {i} " + "é" * (i % 7)} for i in range(103)]
    write_jsonl(tmp_path / "a.jsonl", records, blank_every=10, trailing_newline=trailing_newline)
    fs, shards = all_shards(tmp_path / "a.jsonl", 25, "jsonl")
    assert [(s.start, s.stop) for s in shards] == [(0, 25), (25, 50), (50, 75), (75, 100), (100, 103)]
    got_ids, got_texts = [], []
    for s in shards:
        ids, texts = read_shard(fs, s, "text", "id")
        got_ids += ids.to_pylist()
        got_texts += texts
    assert got_ids == [r["id"] for r in records]
    assert got_texts == [r["text"] for r in records]


def test_parquet_shards_cross_row_groups(tmp_path):
    table = pa.table({"id": [f"d{i}" for i in range(1000)], "text": [f"t{i}" for i in range(1000)],
                      "other": list(range(1000))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=300)
    fs, shards = all_shards(tmp_path / "a.parquet", 400, "parquet")
    assert [(s.start, s.stop) for s in shards] == [(0, 400), (400, 800), (800, 1000)]
    ids = sum((read_shard(fs, s, "text", "id")[0].to_pylist() for s in shards), [])
    assert ids == [f"d{i}" for i in range(1000)]
    _, texts = read_shard(fs, shards[1], "text", "id")
    assert texts[0] == "t400" and texts[-1] == "t799"


def test_folder_input_is_listed_recursively_and_sorted_skipping_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jsonl", "a.jsonl", "sub/c.jsonl", "_skip.jsonl", ".hidden.jsonl", "notes.txt"]:
        write_jsonl(tmp_path / name, [{"id": 1, "text": "x"}])
    _, files = list_inputs(str(tmp_path))
    assert [k for _, k, _ in files] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]


def test_output_names_are_deterministic_and_distinct():
    a = Shard("/x/data/part.jsonl", "data/part.jsonl", "jsonl", 0, 10)
    b = Shard("/x/other/part.jsonl", "other/part.jsonl", "jsonl", 0, 10)
    assert a.output_name == Shard("/y/data/part.jsonl", "data/part.jsonl", "jsonl", 0, 10).output_name
    assert a.output_name != b.output_name
    assert a.output_name != Shard("/x/data/part.jsonl", "data/part.jsonl", "jsonl", 10, 20).output_name
    assert a.output_name.startswith("part-part-") and a.output_name.endswith("-0000000000.parquet")
    assert Shard.from_json(a.to_json()) == a


def test_missing_column_is_named_at_planning(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "x"}])
    fs, files = list_inputs(str(tmp_path / "a.jsonl"))
    with pytest.raises(InputError, match=r"no column 'text'.*'id', 'body'"):
        plan_file(fs, files[0][0], files[0][1], "jsonl", 10, ("id", "text"))
    pq.write_table(pa.table({"doc": [1], "text": ["x"]}), tmp_path / "b.parquet")
    fs, files = list_inputs(str(tmp_path / "b.parquet"))
    with pytest.raises(InputError, match=r"no column 'id'"):
        plan_file(fs, files[0][0], files[0][1], "parquet", 10, ("id", "text"))


def test_null_or_non_text_values_are_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": None}])
    fs, shards = all_shards(tmp_path / "a.jsonl", 10, "jsonl")
    with pytest.raises(InputError, match=r"row 1 \(id='b'\)"):
        read_shard(fs, shards[0], "text", "id")
    pq.write_table(pa.table({"id": [1, 2], "text": [1.5, 2.5]}), tmp_path / "b.parquet")
    fs, shards = all_shards(tmp_path / "b.parquet", 10, "parquet")
    with pytest.raises(InputError, match=r"'text' holds double, expected text"):
        read_shard(fs, shards[0], "text", "id")


def test_unknown_extension_needs_a_format(tmp_path):
    (tmp_path / "a.txt").write_text("{}\n")
    with pytest.raises(ValueError, match="--format"):
        list_inputs(str(tmp_path / "a.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "nope.jsonl"))


def test_output_file_holds_ids_and_fixed_size_float32_embeddings(tmp_path):
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    table = output_table(pa.array([10, 11, 12, 13, 14]), "id", emb, {"model": "m"})
    fs, out = resolve(str(tmp_path))
    path = write_atomic(fs, out, "part-x.parquet", table, "tok")
    back = pq.read_table(path)
    assert back.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 8)
    assert back.column("id").to_pylist() == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(np.stack(back.column(EMBEDDING_COLUMN).to_numpy(zero_copy_only=False)), emb)
    assert back.schema.metadata[b"packformer.model"] == b"m"
    assert complete_rows(fs, path) == 5
    assert complete_rows(fs, str(tmp_path / "missing.parquet")) is None
    assert not list((tmp_path / "_tmp").iterdir())     # the temporary file was renamed into place
