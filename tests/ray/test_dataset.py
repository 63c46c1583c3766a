"""embed_dataset on a local Ray cluster: nothing lost, ids kept, embeddings equal Model.encode, resume
computes only what is missing, and a replica that raises or dies is retried.

Ray is an optional extra (pip install -e ".[ray]"); without it this module is skipped. Most tests use a
small random encoder (2 layers, hidden 64, the built-in WordPiece tokenizer) on 600 rows: several
shards of several packed batches each, on 2 replicas, in seconds on 2 cores (most of a run's time is
starting the replicas' processes). One test runs the real all-MiniLM-L6-v2 through the CLI.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
pytest.importorskip("ray.data", reason='Ray Data is missing: pip install -e ".[ray]"')
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray.cloudpickle  # noqa: E402

import packformer  # noqa: E402
from packformer.ray import embed_dataset  # noqa: E402
from packformer.ray.dataset import data_context  # noqa: E402
from packformer.ray.shards import InputError  # noqa: E402

# Ray's workers cannot import this test module: ship its model factories by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 600


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    data_context().enable_progress_bars = False
    yield
    ray.shutdown()


class TinyModel:
    """Zero-argument factory of a small random encoder; with `fail` set, the first call of embed_batch
    across all replicas (a marker file decides which) raises ("raise") or kills its process ("die")."""

    def __init__(self, fail: str | None = None, marker: str | None = None, prompts: dict | None = None):
        self.fail, self.marker, self.prompts = fail, marker, prompts

    def __call__(self) -> packformer.Model:
        import torch

        from packformer.config import preset
        from packformer.heads import Pooler
        from packformer.loaders.hf import load_tokenizer
        from packformer.loaders.parts import ModelParts
        from packformer.loading import builtin_model_dir
        from packformer.model import Encoder

        cfg = preset("minilm-l6", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        torch.manual_seed(0)
        parts = ModelParts(config=cfg, encoder=Encoder(cfg), head=None, pooler=Pooler("mean"),
                           tokenizer=load_tokenizer(builtin_model_dir(), cfg), max_seq_length=128,
                           source="tiny", format="random")
        model = packformer.Model(parts, max_batch_tokens=2048)
        if self.prompts:                      # as a sentence-transformers folder's prompts would
            model.prompts = dict(self.prompts)
        if self.fail:
            inner, fail, marker = model.embed_batch, self.fail, self.marker

            def flaky(*args, **kwargs):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))    # true for exactly one call
                except FileExistsError:
                    return inner(*args, **kwargs)
                if fail == "die":
                    os._exit(1)
                raise RuntimeError("injected failure")

            model.embed_batch = flaky
        return model


@pytest.fixture(scope="module")
def tiny():
    return TinyModel()()


def make_texts(n: int, seed: int = 7) -> list[str]:
    """WORKLOADS.md's end-to-end text generator (lognormal lengths, median ~24 words)."""
    g = np.random.default_rng(seed)
    vocab = ("river model token batch packed padding engine layer vector query answer city market music "
             "garden winter history science paper review quickly slowly under over between").split()
    return [" ".join(g.choice(vocab, size=int(min(220, max(2, math.exp(g.normal(math.log(24), 0.9)))))))
            for _ in range(n)]


def write_jsonl(path, ids, texts):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": t, "extra": len(t)}) + "\n")


def read_output(out_dir, id_column="id"):
    table = pq.read_table(out_dir)          # the folder as one dataset (manifest and _tmp are ignored)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column(id_column).to_pylist(), emb, table


def assert_matches(out_dir, ids, texts, model, id_column="id"):
    got_ids, emb, table = read_output(out_dir, id_column)
    assert len(got_ids) == len(ids)
    assert sorted(got_ids) == sorted(ids) and len(set(got_ids)) == len(ids)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.dim)
    pos = {i: k for k, i in enumerate(ids)}
    order = [pos[i] for i in got_ids]
    ref = model.encode([texts[k] for k in order])
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=0)


# ---- nothing lost, ids kept, same embeddings ------------------------------------------------------
def test_jsonl_rows_one_row_per_input_and_encode_equal(tmp_path, tiny):
    texts = make_texts(N)
    ids = [f"doc-{i}" for i in range(N)]
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    out, summary = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), replicas=2,
                                 rows_per_shard=90, progress=False)
    assert out == str(tmp_path / "out")
    assert sorted(p for p in os.listdir(out) if not p.startswith("part-")) == ["_packformer.json"]
    assert (summary.total_rows, summary.rows, summary.shards, summary.skipped_shards) == (N, N, 7, 0)
    assert summary.tokens == sum(len(s) for s in tiny.token_ids(texts))
    assert summary.tokens_per_s > 0 and summary.wall_s > 0
    assert_matches(out, ids, texts, tiny)


def test_one_replica_working_on_several_shards_at_once_loses_nothing(tmp_path, tiny):
    """Shards run on threads of one replica (as on a GPU, by default): each file still holds exactly its
    rows, equal to encode()."""
    texts = make_texts(N, seed=13)
    ids = [f"s{i}" for i in range(N)]
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    out, summary = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), replicas=1,
                                 rows_per_shard=60, shards_per_replica=3, progress=False)
    assert (summary.rows, summary.shards, summary.phases["replica_processes"]) == (N, 10, 1)
    assert_matches(out, ids, texts, tiny)


def test_a_prompt_name_embeds_as_encode_does_and_a_bad_task_or_prompt_fails_at_once(tmp_path):
    texts = make_texts(120, seed=17)
    ids = list(range(120))
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    prompts = {"query": "query: ", "document": "passage: "}
    out, _ = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(prompts=prompts), prompt_name="query",
                           rows_per_shard=50, progress=False)
    got_ids, emb, _ = read_output(out)
    ref = TinyModel(prompts=prompts)().encode([texts[i] for i in got_ids], prompt_name="query")
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=0)
    assert np.abs(emb - TinyModel()().encode([texts[i] for i in got_ids])).max() > 1e-3     # the prompt counts
    with pytest.raises(InputError, match="has no task adapters"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "o2", TinyModel(), task="retrieval.query", progress=False)
    with pytest.raises(InputError, match="nope"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "o3", TinyModel(prompts=prompts), prompt_name="nope",
                      progress=False)


def test_summary_says_where_the_time_went(tmp_path):
    texts = make_texts(N, seed=11)
    write_jsonl(tmp_path / "in.jsonl", list(range(N)), texts)
    _, s = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), replicas=2, rows_per_shard=100,
                         progress=False)
    p = s.phases
    # no replica was restarted (Ray Data may run every shard on the replica that started first)
    assert 1 <= p["replica_processes"] <= 2
    assert 0 < p["first_shard_s"] < s.wall_s and 0 < p["shards_s"] < s.wall_s
    assert p["first_shard_s"] + p["shards_s"] + p["finish_s"] == pytest.approx(s.wall_s, abs=0.05)
    assert p["model_load_s"] > 0 and p["replica_start_s"] >= 0 and p["ray_init_s"] >= 0
    assert p["encode_s"] > 0 and p["read_s"] > 0 and p["write_s"] > 0 and p["capture_s"] == 0   # CPU: no graphs
    assert p["read_s"] + p["encode_s"] + p["write_s"] <= s.embed_s + 1e-6
    assert s.steady_rows_per_s > s.rows_per_s
    d = s.to_dict()
    assert d["phases"] == p and d["steady_rows_per_s"] == s.steady_rows_per_s
    assert "where the time went: Ray start" in str(s) and "rows/s), summed over replicas" in str(s)


def test_parquet_folder_int_ids_custom_columns(tmp_path, tiny):
    texts = make_texts(N, seed=3)
    ids = list(range(10_000, 10_000 + N))
    (tmp_path / "in").mkdir()
    for k, (a, b) in enumerate([(0, 360), (360, N)]):      # two files, several row groups each
        pq.write_table(pa.table({"doc_id": ids[a:b], "body": texts[a:b]}), tmp_path / "in" / f"p{k}.parquet",
                       row_group_size=100)
    out, summary = embed_dataset(tmp_path / "in", tmp_path / "out", TinyModel(), text_column="body",
                                 id_column="doc_id", replicas=2, rows_per_shard=150, progress=False)
    assert (summary.rows, summary.shards) == (N, 3 + 2)
    got_ids, _, table = read_output(out, "doc_id")
    assert table.schema.field("doc_id").type == pa.int64()
    assert_matches(out, ids, texts, tiny, id_column="doc_id")


# ---- resume -------------------------------------------------------------------------------------
def test_resume_computes_only_the_missing_shard(tmp_path, tiny):
    texts = make_texts(N, seed=5)
    ids = [f"r{i}" for i in range(N)]
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    kw = dict(replicas=1, rows_per_shard=180, progress=False)
    out, first = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), **kw)
    parts = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    assert len(parts) == first.shards == 4
    # an interrupted run: one shard's file missing, and a half-written temporary file left behind
    os.remove(os.path.join(out, parts[1]))
    os.makedirs(os.path.join(out, "_tmp"), exist_ok=True)
    open(os.path.join(out, "_tmp", parts[1] + ".x"), "wb").write(b"PAR1 half")
    untouched = os.stat(os.path.join(out, parts[0])).st_mtime_ns
    _, again = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), **kw)
    assert (again.rows, again.shards, again.skipped_shards, again.skipped_rows) == (180, 1, 3, N - 180)
    assert os.stat(os.path.join(out, parts[0])).st_mtime_ns == untouched
    assert_matches(out, ids, texts, tiny)
    # all done: nothing runs (Ray is not even needed)
    _, none = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), **kw)
    assert (none.rows, none.shards, none.skipped_rows) == (0, 0, N)
    # --overwrite recomputes everything
    _, over = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), overwrite=True, **kw)
    assert (over.rows, over.skipped_shards) == (N, 0)
    assert_matches(out, ids, texts, tiny)


def test_resume_refuses_other_settings_or_foreign_files(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ["a", "b", "c"], ["x", "y", "z"])
    embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), rows_per_shard=2, progress=False)
    with pytest.raises(ValueError, match=r"rows_per_shard: 2 then, 1 now.*--overwrite"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), rows_per_shard=1, progress=False)
    with pytest.raises(ValueError, match=r"text_column: 'text' then, 'extra' now"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), rows_per_shard=2,
                      text_column="extra", progress=False)
    open(tmp_path / "out" / "part-stray-00000000-0000000000.parquet", "wb").close()
    with pytest.raises(ValueError, match="part files of no shard of this input"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), rows_per_shard=2, progress=False)


# ---- faults -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fail,shards_per_replica", [("raise", 1), ("die", 1), ("die", 3)])
def test_replica_that_fails_once_is_retried_and_nothing_is_lost(tmp_path, tiny, fail, shards_per_replica):
    """With 3 shards per replica, the replica that dies takes the other shards it was working on with it:
    they are run again too."""
    texts = make_texts(600, seed=11)
    ids = [f"f{i}" for i in range(600)]
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    marker = str(tmp_path / "failed-once")
    out, summary = embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(fail, marker), replicas=2,
                                 rows_per_shard=100, progress=False, shards_per_replica=shards_per_replica)
    assert os.path.exists(marker)                        # the failure did happen ...
    assert (summary.rows, summary.shards) == (600, 6)    # ... and every shard still completed
    assert_matches(out, ids, texts, tiny)


def test_bad_input_fails_at_once_with_the_row_named(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        f.write(json.dumps({"id": 1, "text": "fine"}) + "\n" + json.dumps({"id": 2, "text": None}) + "\n")
    with pytest.raises(InputError, match=r"row 1 \(id=2\)"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), progress=False, max_retries=50)


def test_argument_errors_are_clear(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ["a"], ["x"])
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), replicas=0)
    with pytest.raises(ValueError, match="shards_per_replica must be at least 1, got 0"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), shards_per_replica=0)
    with pytest.raises(InputError, match="no column 'body'"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), text_column="body")
    with pytest.raises(FileNotFoundError):
        embed_dataset(tmp_path / "missing.jsonl", tmp_path / "out", TinyModel())
    # replicas that could never be placed fail at once instead of waiting forever
    with pytest.raises(RuntimeError, match=r"1 x 1 GPU but the cluster has 0"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), gpus_per_replica=1)
    with pytest.raises(RuntimeError, match=r"3 x 1 CPU but the cluster has 2"):
        embed_dataset(tmp_path / "in.jsonl", tmp_path / "out", TinyModel(), replicas=3, cpus_per_replica=1)


# ---- the CLI, with the real model -----------------------------------------------------------------
def test_cli_embed_dataset_with_the_builtin_model(tmp_path, minilm, capsys):
    from packformer.cli import main

    texts = make_texts(120, seed=2)
    ids = [f"c{i}" for i in range(120)]
    write_jsonl(tmp_path / "in.jsonl", ids, texts)
    rc = main(["embed-dataset", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"),
               "--replicas", "2", "--rows-per-shard", "50", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "embedded 120 rows" in err and "tokens/s" in err and "where the time went" in err
    assert_matches(str(tmp_path / "out"), ids, texts, minilm)
