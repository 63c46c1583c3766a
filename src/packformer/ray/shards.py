"""Input shards of a bulk-embedding job, and the one output file each shard becomes.

Why shards of our own rather than Ray Data's readers: resume must be exact, so every output file has to
hold exactly the rows of one input range that is the same on every run. Ray Data's readers choose their
block boundaries from the cluster's size and do not say which input rows a block holds. Here the driver
splits every input file into ranges of `rows_per_shard` rows (Parquet: from the footer's row count;
JSONL: from one scan recording the byte offset of every `rows_per_shard`-th record), and a shard is
read with pyarrow — the library under Ray Data's Parquet and JSON readers, through the same
`pyarrow.fs` filesystems (local paths, s3://, gs://, hdfs://...).

Shard `k` of input file `f` always becomes `part-<stem>-<hash of f's relative path>-<first row>.parquet`,
written to a temporary name and renamed into place once complete, so a file that exists is whole.
Plain pyarrow; no Ray in here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

FORMATS = ("parquet", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
PART_PREFIX = "part-"
TMP_DIR = "_tmp"             # names starting with "_" are ignored by pyarrow.dataset and ray.data readers
MANIFEST = "_packformer.json"
EMBEDDING_COLUMN = "embedding"


class InputError(ValueError):
    """Bad input data (missing column, null or non-text value): fails the job at once, never retried."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input file; for JSONL also the bytes [byte_start, byte_stop) holding them."""

    path: str                # path inside `filesystem_uri`'s filesystem
    key: str                 # the path relative to the input root: names the output file
    format: str
    start: int
    stop: int
    byte_start: int = 0
    byte_stop: int = 0

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def output_name(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(self.key).stem)[:60] or "input"
        digest = hashlib.sha1(self.key.encode("utf-8")).hexdigest()[:8]
        return f"{PART_PREFIX}{stem}-{digest}-{self.start:010d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Shard":
        return cls(**json.loads(s))


# ---- inputs -------------------------------------------------------------------------------------
def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (s3://, gs://, hdfs://, file://) -> (pyarrow filesystem, path in it)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def infer_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"cannot tell the format of {path!r} from its extension; pass --format parquet|jsonl")
    return _SUFFIXES[suffix]


def list_inputs(uri: str, fmt: str | None = None) -> tuple[pafs.FileSystem, list[tuple[str, str, str]]]:
    """A file or a folder (searched recursively; hidden and `_`-prefixed names skipped) ->
    (filesystem, sorted [(path, key relative to the root, format)])."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [(path, PurePosixPath(path).name, infer_format(path, fmt))]
    found = []
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = PurePosixPath(f.path).relative_to(PurePosixPath(path))
        if f.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.parts):
            continue
        suffix = rel.suffix.lower()
        if fmt is None and suffix in _SUFFIXES or fmt is not None and _SUFFIXES.get(suffix) == fmt:
            found.append((f.path, str(rel), infer_format(f.path, fmt)))
    if not found:
        kinds = f"{fmt} files" if fmt else "files ending in " + ", ".join(sorted(_SUFFIXES))
        raise FileNotFoundError(f"input folder {uri!r} holds no {kinds}")
    return fs, sorted(found, key=lambda t: t[1])


def _check_columns(names: list[str], columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{where} has no column {', '.join(map(repr, missing))}; its columns are "
                         f"{', '.join(map(repr, names))} (choose with --text-column / --id-column)")


def plan_file(fs: pafs.FileSystem, path: str, key: str, fmt: str, rows_per_shard: int,
              columns: tuple[str, ...]) -> list[Shard]:
    """One input file -> its shards of `rows_per_shard` rows (the last one shorter). Checks that the
    file has the needed columns (JSONL: in its first record)."""
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            _check_columns(meta.schema.to_arrow_schema().names, columns, path)
            n = meta.num_rows
        return [Shard(path, key, fmt, a, min(a + rows_per_shard, n)) for a in range(0, n, rows_per_shard)]
    # JSONL: one pass recording where every rows_per_shard-th record starts (blank lines are not records)
    starts, row, pos = [], 0, 0
    with fs.open_input_stream(path) as f:
        for line in _lines(f):
            if line.strip():
                if row == 0:
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}: line 1 is not JSON ({e})") from e
                    if not isinstance(first, dict):
                        raise InputError(f"{path}: records must be JSON objects, line 1 is {type(first).__name__}")
                    _check_columns(list(first), columns, path)
                if row % rows_per_shard == 0:
                    starts.append(pos)
                row += 1
            pos += len(line)
    bounds = starts[1:] + [pos]
    return [Shard(path, key, fmt, i * rows_per_shard, min((i + 1) * rows_per_shard, row), b0, b1)
            for i, (b0, b1) in enumerate(zip(starts, bounds))]


def _lines(stream, block: int = 1 << 22):
    """Lines (with their b'\\n') of a pyarrow input stream, read in large blocks."""
    rest = b""
    while True:
        buf = stream.read(block)
        if not buf:
            break
        buf = rest + buf
        lines = buf.split(b"\n")
        rest = lines.pop()
        for ln in lines:
            yield ln + b"\n"
    if rest:
        yield rest


# ---- one shard ----------------------------------------------------------------------------------
def read_shard(fs: pafs.FileSystem, shard: Shard, text_column: str, id_column: str) -> tuple[pa.Array, list[str]]:
    """The shard's ids (an Arrow array of the input's type) and texts; raises InputError naming the
    file and the id of a null or non-text value, or when the row count differs from the plan."""
    if shard.format == "parquet":
        with fs.open_input_file(shard.path) as f:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < shard.stop and offset + n > shard.start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pf.read_row_groups(groups, columns=[id_column, text_column])
        table = table.slice(shard.start - (first or 0), shard.num_rows)
    else:
        with fs.open_input_file(shard.path) as f:
            f.seek(shard.byte_start)
            data = f.read(shard.byte_stop - shard.byte_start)
        try:
            table = pajson.read_json(pa.BufferReader(data),
                                     read_options=pajson.ReadOptions(block_size=max(len(data) + 1, 1 << 20)))
        except pa.ArrowInvalid as e:
            raise InputError(f"{shard.path}: records {shard.start}..{shard.stop - 1} are not valid JSON lines: {e}") from e
        _check_columns(table.column_names, (id_column, text_column), f"{shard.path} (records {shard.start}..)")
    if table.num_rows != shard.num_rows:
        raise InputError(f"{shard.path}: expected {shard.num_rows} records at {shard.start}.., read {table.num_rows}; "
                         "was the file changed since the job started?")
    ids, texts = table.column(id_column).combine_chunks(), table.column(text_column)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_null(texts.type)):
        raise InputError(f"{shard.path}: column {text_column!r} holds {texts.type}, expected text")
    texts = texts.to_pylist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"{shard.path}: {len(bad)} rows have no text in {text_column!r} (null), first at "
                         f"row {shard.start + bad[0]} ({id_column}={ids[bad[0]].as_py()!r})")
    if ids.null_count:
        i = next(i for i, v in enumerate(ids.to_pylist()) if v is None)
        raise InputError(f"{shard.path}: row {shard.start + i} has a null {id_column!r}")
    return ids, texts


def output_table(ids: pa.Array, id_column: str, emb: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """ids + embeddings [N, D] -> a table with the id column and a fixed-size list<float32>[D] column."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)                       # [N, D]
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    table = pa.table({id_column: ids, EMBEDDING_COLUMN: col})
    return table.replace_schema_metadata({f"packformer.{k}": str(v) for k, v in metadata.items()})


def write_atomic(fs: pafs.FileSystem, out_dir: str, name: str, table: pa.Table, token: str) -> str:
    """Write under `_tmp/`, then rename into place: an output file that exists is complete."""
    tmp = f"{out_dir}/{TMP_DIR}/{name}.{token}"
    final = f"{out_dir}/{name}"
    fs.create_dir(f"{out_dir}/{TMP_DIR}", recursive=True)
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, final)
    return final


def complete_rows(fs: pafs.FileSystem, path: str) -> int | None:
    """Rows of an existing output file per its footer; None if it is missing or unreadable."""
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowInvalid):
        return None
