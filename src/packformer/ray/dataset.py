"""Bulk embedding of a dataset on Ray: `embed_dataset(input, output, model)` -> (output path, summary).

How a job runs. The driver splits the input into shards (packformer.ray.shards) and drops those whose
output file already exists whole (resume). The rest become a Ray Data dataset of shard descriptions,
mapped by `ShardEmbedder`, an actor class: Ray Data keeps `replicas` of them (each loads the model once,
on its own GPU when `gpus_per_replica` is set) and feeds them one shard per call, `shards_per_replica`
calls at once (on a GPU, 3: while one shard's batches run on the device, others are read, tokenized
and written; the model serializes its launches). A replica reads its shard, packs the texts under the
token budget, embeds them with encode()'s pipeline and writes the shard's Parquet file atomically,
returning only a few counters and where its time went. Writes are idempotent, so Ray may retry a shard
freely: an actor that dies is restarted and its shards re-run (actor options `max_restarts`,
`max_task_retries`), and a shard whose replica raises is run again in place (DataContext
`retried_map_errors`, `max_map_retries`), up to `max_retries` times each; bad input (InputError) fails
the job at once.
At the end every shard's file is checked against its planned row count: nothing is lost silently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

RAY_MISSING = 'packformer.ray needs Ray Data and pyarrow: pip install -e ".[ray]"  (or: pip install "ray[data,serve]" pyarrow)'


def require_ray() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from e


# ---- what a job is ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """Everything a replica needs, shipped to it once at construction."""

    model: Any                   # path / name / 'random:<preset>' / None (built-in), or a zero-arg factory
    input: str
    output: str
    text_column: str = "text"
    id_column: str = "id"
    device: str = "cpu"
    dtype: str | None = None
    batch_tokens: int | None = None
    normalize: bool | None = None
    task: str | None = None              # models with task adapters (jina-embeddings-v3): the adapter
    prompt_name: str | None = None       # a prompt of the model folder's (sentence-transformers prompts)
    truncate: bool = True
    threads: int = 1

    def load_model(self):
        import packformer

        if callable(self.model):
            return self.model()
        return packformer.load(self.model, device=self.device, dtype=self.dtype, max_batch_tokens=self.batch_tokens)

    def settings(self, rows_per_shard: int) -> dict[str, Any]:
        """What decides the output's content: a resumed run must match it (the batch budget does not
        change results, the replica count neither)."""
        model = self.model if not callable(self.model) else f"callable:{getattr(self.model, '__qualname__', type(self.model).__qualname__)}"
        return {"model": None if model is None else str(model), "input": self.input, "text_column": self.text_column,
                "id_column": self.id_column, "dtype": self.dtype, "device_type": self.device,
                "normalize": self.normalize, "truncate": self.truncate, "rows_per_shard": rows_per_shard,
                "task": self.task, "prompt_name": self.prompt_name}


@dataclass
class EmbedSummary:
    """What a run did. `rows`/`tokens` count the rows embedded by this run; skipped shards were already
    written by an earlier run."""

    output: str
    total_rows: int
    rows: int
    tokens: int
    wall_s: float
    shards: int
    skipped_shards: int
    skipped_rows: int
    replicas: int
    embed_s: float = 0.0         # summed over replicas: time inside read + encode + write
    phases: dict[str, float] = dataclasses.field(default_factory=dict)   # where the time went: job_phases()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_rows_per_s(self) -> float:
        """Rows per second from the first shard's start to the last one's end: the replicas' rate once
        started, without Ray's start-up, the model loads and the final checks."""
        span = self.phases.get("shards_s", 0.0)
        return self.rows / span if span > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s, "rows_per_s": self.rows_per_s,
                "steady_rows_per_s": self.steady_rows_per_s}

    def __str__(self) -> str:
        skipped = f", {self.skipped_rows} rows in {self.skipped_shards} shards already done" if self.skipped_shards else ""
        text = (f"embedded {self.rows} rows ({self.tokens} tokens) in {self.shards} shards on {self.replicas} "
                f"replica(s) in {self.wall_s:.1f} s: {self.rows_per_s:,.1f} rows/s, {self.tokens_per_s:,.0f} tokens/s"
                f"{skipped}; {self.total_rows} rows in {self.output}")
        p = self.phases
        if p:
            text += (f"\n  where the time went: Ray start {p['ray_init_s']:.1f} s, first replica up "
                     f"{p['replica_start_s']:.1f} s after launch, model load {p['model_load_s']:.1f} s (slowest "
                     f"replica), first shard at {p['first_shard_s']:.1f} s; shards ran {p['shards_s']:.1f} s "
                     f"({self.steady_rows_per_s:,.1f} rows/s), summed over replicas: read {p['read_s']:.1f} s, "
                     f"encode {p['encode_s']:.1f} s (waiting for the tokenizer {p['tokenize_wait_s']:.1f} s, "
                     f"CUDA graph capture {p['capture_s']:.1f} s), Arrow + write {p['write_s']:.1f} s; "
                     f"Ray shutdown and output checks {p['finish_s']:.1f} s")
        return text


def job_phases(results: dict[str, np.ndarray], job_start: float, launch: float, ray_init_s: float,
               end: float) -> dict[str, float]:
    """Where a run's time went, from the replicas' per-shard results (RESULT_KEYS) and the driver's
    wall-clock marks (time.time()): `job_start` when embed_dataset began, `launch` when the dataset
    was handed to Ray, `end` after the shards finished. A replica restarted by Ray counts as another
    replica (`replica_processes`)."""
    starts = results["start"].astype(float)
    ends = starts + results["seconds"].astype(float)
    replicas: dict[str, tuple[float, float]] = {}           # replica -> (process up, model loaded)
    capture: dict[str, float] = {}                          # replica -> its graph capture so far (a running total)
    for r, a, b, c in zip(results["replica"], results["replica_start"], results["replica_ready"], results["capture_s"]):
        replicas[str(r)] = (float(a), float(b))
        capture[str(r)] = max(capture.get(str(r), 0.0), float(c))
    return {
        "ray_init_s": ray_init_s,
        "replica_start_s": min(a for a, _ in replicas.values()) - launch,       # process start + imports
        "model_load_s": max(b - a for a, b in replicas.values()),
        "replica_processes": float(len(replicas)),
        "first_shard_s": float(starts.min()) - job_start,
        "shards_s": float(ends.max() - starts.min()),
        **{k: float(np.sum(results[k])) for k in ("read_s", "encode_s", "write_s", "tokenize_wait_s")},
        "capture_s": sum(capture.values()),
        "finish_s": end - float(ends.max()),
    }


# ---- the replica --------------------------------------------------------------------------------
# What a replica returns per shard: counters, and where its time went (seconds; `replica_start`,
# `replica_ready` and `start` are wall-clock times, time.time(), so the driver can place them on its clock;
# `capture_s` is the replica's total so far, since shards of one replica overlap).
RESULT_KEYS = ("name", "rows", "tokens", "seconds", "error", "replica", "replica_start", "replica_ready",
               "start", "read_s", "encode_s", "write_s", "tokenize_wait_s", "capture_s")


def _capture_seconds(model) -> float:
    """Seconds the model's runner has spent capturing CUDA graphs so far (0 for runners without graphs)."""
    return float(getattr(model.runner, "capture_s", 0.0))


class ShardEmbedder:
    """Ray Data actor: loads the model once, then turns shard descriptions into written shard files."""

    def __init__(self, job: Job):
        started = time.time()
        # Replicas share the machine's cores: each uses only the cores Ray gave it.
        from ..fast.cpu_threads import limit_process_threads
        from .shards import resolve

        limit_process_threads(job.threads)

        self.job = job
        self.model = job.load_model()
        self.in_fs, _ = resolve(job.input)
        self.out_fs, self.out_dir = resolve(job.output)
        # a task or prompt the model does not have fails the job at once (as bad input does), not per retry
        try:
            self.model.text_prefix(self.model.resolve_task(job.task), None, job.prompt_name)
            self.setup_error = ""
        except (ValueError, KeyError) as e:
            self.setup_error = f"{type(e).__name__}: {e}"
        self.replica = {"replica": uuid.uuid4().hex[:12], "replica_start": started, "replica_ready": time.time()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.run_shard(s) for s in batch["shard"]]
        return {k: np.asarray([r[k] for r in rows]) for k in RESULT_KEYS}

    def run_shard(self, shard_json: str) -> dict[str, Any]:
        from packformer.pipeline import RunStats

        from .shards import InputError, Shard, output_table, read_shard, write_atomic

        start, t0 = time.time(), time.perf_counter()
        shard = Shard.from_json(str(shard_json))
        result = {**self.replica, "name": shard.output_name, "rows": 0, "tokens": 0, "seconds": 0.0, "start": start,
                  "read_s": 0.0, "encode_s": 0.0, "write_s": 0.0, "tokenize_wait_s": 0.0, "capture_s": 0.0,
                  "error": self.setup_error}
        # Errors are returned, not raised: Ray would retry an exception (in vain) and only pass its text on.
        if self.setup_error:
            return result
        try:
            ids, texts = read_shard(self.in_fs, shard, self.job.text_column, self.job.id_column)
        except InputError as e:
            return {**result, "error": str(e)}
        # encode()'s own pipeline: the next chunk is tokenized while the device runs this one
        t1, stats = time.perf_counter(), RunStats()
        emb = self.model.embed_texts(texts, self.job.normalize, self.job.truncate, self.job.task,
                                     prompt_name=self.job.prompt_name, stats=stats).numpy()           # [N, D]
        t2 = time.perf_counter()
        meta = {"model": self.model.source, "source": shard.key, "rows": f"{shard.start}:{shard.stop}",
                "normalize": self.job.normalize, "dtype": str(self.model.dtype).replace("torch.", ""),
                "task": self.job.task, "prompt_name": self.job.prompt_name}
        table = output_table(ids, self.job.id_column, emb, meta)
        write_atomic(self.out_fs, self.out_dir, shard.output_name, table, uuid.uuid4().hex)
        t3 = time.perf_counter()
        return {**result, "rows": len(texts), "tokens": stats.tokens, "seconds": t3 - t0,
                "read_s": t1 - t0, "encode_s": t2 - t1, "write_s": t3 - t2,
                "tokenize_wait_s": stats.tokenize_wait_s, "capture_s": _capture_seconds(self.model)}


# ---- the driver ---------------------------------------------------------------------------------
def plan(job: Job, fmt: str | None, rows_per_shard: int):
    from .shards import list_inputs, plan_file

    fs, files = list_inputs(job.input, fmt)
    shards = [s for path, key, f in files
              for s in plan_file(fs, path, key, f, rows_per_shard, (job.text_column, job.id_column))]
    return shards


def model_spec(model: Any) -> Any:
    """A model argument as replicas can use it: an existing local path made absolute (replicas may run in
    another working directory); names, presets, None and factories as they are."""
    if isinstance(model, (str, Path)) and not str(model).startswith("random:") and Path(model).exists():
        return str(Path(model).resolve())
    if isinstance(model, Path):
        raise FileNotFoundError(f"model path not found: {model}")
    return model


def prepare_output(job: Job, shards, rows_per_shard: int, overwrite: bool):
    """Create the output folder and its manifest; -> (pending shards, shards already written whole).
    Refuses, with the difference named, to resume into a folder written with other settings or holding
    part files of no shard of this input."""
    import pyarrow.fs as pafs

    from .shards import MANIFEST, PART_PREFIX, complete_rows, resolve

    fs, out = resolve(job.output)
    info = fs.get_file_info(out)
    if info.type == pafs.FileType.File:
        raise ValueError(f"output {job.output!r} is a file; give a folder")
    fs.create_dir(out, recursive=True)
    listing = fs.get_file_info(pafs.FileSelector(out))
    parts = {Path(f.path).name for f in listing if f.type == pafs.FileType.File
             and Path(f.path).name.startswith(PART_PREFIX) and f.path.endswith(".parquet")}
    manifest_path = f"{out}/{MANIFEST}"
    has_manifest = fs.get_file_info(manifest_path).type == pafs.FileType.File
    settings = job.settings(rows_per_shard)
    if overwrite:
        for name in parts:
            fs.delete_file(f"{out}/{name}")
        parts = set()
    elif has_manifest and parts:            # the settings matter only once something was written with them
        with fs.open_input_stream(manifest_path) as f:
            old = json.loads(f.read().decode("utf-8")).get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"output {job.output!r} was written with other settings ({what}); "
                             "re-run with the same ones to resume, or pass --overwrite")
    elif parts:
        raise ValueError(f"output {job.output!r} holds {len(parts)} part files but no {MANIFEST}: not written by "
                         "packformer embed-dataset; choose another folder or pass --overwrite")
    expected = {s.output_name for s in shards}
    stray = sorted(parts - expected)
    if stray:
        raise ValueError(f"output {job.output!r} holds {len(stray)} part files of no shard of this input "
                         f"(first: {stray[0]}); choose another folder or pass --overwrite")
    remove_tmp(job)                              # halves of files from an interrupted run
    with fs.open_output_stream(manifest_path) as f:
        f.write(json.dumps({"writer": "packformer embed-dataset", "settings": settings}, indent=1).encode())
    done = [s for s in shards if s.output_name in parts and complete_rows(fs, f"{out}/{s.output_name}") == s.num_rows]
    done_names = {s.output_name for s in done}
    return [s for s in shards if s.output_name not in done_names], done


def verify_output(job: Job, shards) -> None:
    """Every shard's file exists with its planned row count, or RuntimeError naming the first that does not."""
    from .shards import complete_rows, resolve

    fs, out = resolve(job.output)
    for s in shards:
        n = complete_rows(fs, f"{out}/{s.output_name}")
        if n != s.num_rows:
            raise RuntimeError(f"shard {s.output_name} ({s.path} rows {s.start}..{s.stop - 1}) has "
                               f"{'no file' if n is None else f'{n} rows'}, expected {s.num_rows}")


def remove_tmp(job: Job) -> None:
    """Drop the folder of temporary files (empty after a complete run)."""
    import pyarrow.fs as pafs

    from .shards import TMP_DIR, resolve

    fs, out = resolve(job.output)
    if fs.get_file_info(f"{out}/{TMP_DIR}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{out}/{TMP_DIR}")


@contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Join the cluster at `address`, or start a local Ray sized to this machine; reuse a Ray already
    initialized in this process (and leave it running). Yields whether it started one."""
    import ray

    if ray.is_initialized():
        yield False
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ray.init(num_cpus=cpus, include_dashboard=False)
    try:
        yield True
    finally:
        ray.shutdown()


def replica_cpus(replicas: int, requested: float | None) -> float:
    """CPUs per replica: as asked, else an equal share of the cluster's CPUs (at least 1), so that
    replicas never oversubscribe the cores."""
    import ray

    if requested is not None:
        return requested
    total = ray.cluster_resources().get("CPU", 1.0)
    per_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total)
    return float(max(1, min(int(total // replicas), int(per_node))))


def check_resources(replicas: int, cpus: float, gpus: float, strict: bool) -> None:
    """Replicas that cannot all be placed would wait forever: fail at once naming what is missing
    (`strict`: a local Ray that cannot grow), else only warn (a joined cluster may autoscale)."""
    import ray

    have = ray.cluster_resources()
    short = [f"{replicas} x {need:g} {kind} but the cluster has {have.get(kind, 0.0):g}"
             for kind, need in (("CPU", cpus), ("GPU", gpus)) if need and replicas * need > have.get(kind, 0.0)]
    if short:
        msg = f"not enough resources for {replicas} replica(s): " + "; ".join(short)
        if strict:
            raise RuntimeError(msg + " (lower --replicas, --cpus-per-replica or --gpus-per-replica)")
        warnings.warn(msg + "; waiting for the cluster to provide them", RuntimeWarning, stacklevel=3)


def embed_dataset(input: str | os.PathLike, output: str | os.PathLike, model: Any = None, *,
                  text_column: str = "text", id_column: str = "id", format: str | None = None,
                  replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float | None = None,
                  batch_tokens: int | None = None, dtype: str | None = None, normalize: bool | None = None,
                  task: str | None = None, prompt_name: str | None = None,
                  truncate: bool = True, rows_per_shard: int = 10_000, ray_address: str | None = None,
                  overwrite: bool = False, max_retries: int = 3, progress: bool = True,
                  shards_per_replica: int | None = None) -> tuple[str, EmbedSummary]:
    """Embed column `text_column` of a Parquet or JSONL file or folder into Parquet files under `output`
    (columns: `id_column` as in the input, and `embedding`, a fixed-size list of float32), on `replicas`
    Ray actors each holding the model (`gpus_per_replica` GPUs each: 0 runs on CPU). Re-running over the
    same output resumes: shards already written are skipped unless `overwrite`. `model` is a path, a
    name, 'random:<preset>', None (the built-in all-MiniLM-L6-v2), or a zero-argument callable returning
    a packformer Model. `task` and `prompt_name` are encode()'s: the adapter of models with tasks, a
    prompt of the model folder's. `shards_per_replica`: shards each replica works on at once (default: 3 with
    GPUs, so that reading, tokenizing and writing overlap the device's work; 1 on CPU, where the model
    itself uses every core). Returns (output folder, EmbedSummary)."""
    require_ray()
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be 0 or more, got {gpus_per_replica}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
    if shards_per_replica is None:
        shards_per_replica = GPU_SHARDS_PER_REPLICA if gpus_per_replica > 0 else 1
    if shards_per_replica < 1:
        raise ValueError(f"shards_per_replica must be at least 1, got {shards_per_replica}")
    model = model_spec(model)
    input, output = os.fspath(input), os.fspath(output)
    job = Job(model=model, input=input if "://" in input else os.path.abspath(input),
              output=output if "://" in output else os.path.abspath(output), text_column=text_column,
              id_column=id_column, device="cuda" if gpus_per_replica > 0 else "cpu", dtype=dtype,
              batch_tokens=batch_tokens, normalize=normalize, truncate=truncate, task=task, prompt_name=prompt_name)
    t0, job_start = time.perf_counter(), time.time()
    shards = plan(job, format, rows_per_shard)
    pending, done = prepare_output(job, shards, rows_per_shard, overwrite)
    summary = EmbedSummary(output=job.output, total_rows=sum(s.num_rows for s in shards), rows=0, tokens=0,
                           wall_s=0.0, shards=len(pending), skipped_shards=len(done),
                           skipped_rows=sum(s.num_rows for s in done), replicas=replicas)
    if pending:
        results, marks = _run(job, pending, replicas, gpus_per_replica, cpus_per_replica, ray_address,
                              max_retries, progress, shards_per_replica)
        got = {str(n) for n in results["name"]}
        missing = [s.output_name for s in pending if s.output_name not in got]
        if missing:
            raise RuntimeError(f"{len(missing)} shards returned no result (first: {missing[0]})")
        summary.rows = int(np.sum(results["rows"]))
        summary.tokens = int(np.sum(results["tokens"]))
        summary.embed_s = float(np.sum(results["seconds"]))
    verify_output(job, shards)
    remove_tmp(job)
    summary.wall_s = time.perf_counter() - t0
    if pending and len(results["name"]):
        summary.phases = job_phases(results, job_start, marks["launch"], marks["ray_init_s"], time.time())
    return job.output, summary


GPU_SHARDS_PER_REPLICA = 3


def pool_strategy(replicas: int, shards_per_replica: int):
    """A fixed pool of `replicas` actors, each running up to `shards_per_replica` calls at once on
    threads of its own (Ray Data runs one call per actor at a time otherwise)."""
    import ray.data

    if shards_per_replica == 1:
        return ray.data.ActorPoolStrategy(size=replicas)
    return ray.data.ActorPoolStrategy(size=replicas, max_concurrent_calls_per_actor=shards_per_replica,
                                      enable_true_multi_threading=True)


def data_context():
    """Ray Data's current DataContext. Creating it the first time, Ray 2.60's own constructor sets three
    of its deprecated fields and warns about each (DeprecationWarning from ray.data.context): noise to
    our users, so hushed here."""
    import ray.data

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        return ray.data.DataContext.get_current()


def _run(job: Job, pending, replicas: int, gpus_per_replica: float, cpus_per_replica: float | None,
         ray_address: str | None, max_retries: int, progress: bool,
         shards_per_replica: int = 1) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """-> (the replicas' results as columns of RESULT_KEYS, the driver's marks: seconds to start or join
    Ray, and the wall-clock time the dataset was handed to Ray)."""
    import ray
    import ray.data

    from .shards import InputError

    t0 = time.perf_counter()
    with ray_session(ray_address):
        marks = {"ray_init_s": time.perf_counter() - t0}
        cpus = replica_cpus(replicas, cpus_per_replica)
        check_resources(replicas, cpus, gpus_per_replica, strict=not ray_address)
        job = dataclasses.replace(job, threads=max(1, int(cpus)))
        ctx = data_context()
        knobs = {"retried_map_errors": True, "max_map_retries": max_retries, "enable_progress_bars": progress}
        saved = {k: getattr(ctx, k) for k in knobs}
        for k, v in knobs.items():          # an exception in a replica: run the shard again, in place
            setattr(ctx, k, v)
        rows = []
        try:
            marks["launch"] = time.time()
            ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
            with warnings.catch_warnings():
                # A replica that dies is restarted and its shard re-run, at most max_retries times. Ray 2.60
                # deprecates passing these two actor options this way but offers no other way to bound them
                # (its default, -1, retries a shard that kills its replica forever).
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                ds = ds.map_batches(ShardEmbedder, fn_constructor_kwargs={"job": job}, batch_size=1,
                                    compute=pool_strategy(replicas, shards_per_replica), num_cpus=cpus,
                                    num_gpus=gpus_per_replica or None, max_restarts=-1, max_task_retries=max_retries)
            for row in ds.iter_rows():
                if row["error"]:
                    raise InputError(str(row["error"]))     # leaving the loop stops the job
                rows.append(row)
        finally:
            for k, v in saved.items():
                setattr(ctx, k, v)
    return {k: np.asarray([r[k] for r in rows]) for k in RESULT_KEYS}, marks
