"""`packformer embed-dataset`: embed a Parquet/JSONL dataset on Ray into Parquet files (id, embedding)."""
from __future__ import annotations

import argparse
import json
import sys

from .common import NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE, POSITIVE_NUMBER


def add_parser(sub):
    p = sub.add_parser(
        "embed-dataset", help="embed a Parquet/JSONL dataset on Ray (bulk, resumable)",
        description="Embed one text column of a Parquet or JSONL file or folder on Ray: REPLICAS actors each "
                    "hold the model and embed shards of ROWS_PER_SHARD rows, each written to its own Parquet file "
                    "(the id column and 'embedding', a fixed-size list of float32). Re-running over the same "
                    "output resumes: shards already written are skipped. Needs pip install -e \".[ray]\".")
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or 'random:<preset>' (default: built-in all-MiniLM-L6-v2)")
    p.add_argument("--input", "-i", required=True, help="a .parquet/.jsonl file, a folder of them, or a URI (s3://...)")
    p.add_argument("--output", "-o", required=True, help="output folder (created; resumed if it exists)")
    p.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    p.add_argument("--id-column", default="id", help="column copied to the output next to each embedding (default: id)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default=None,
                   help="input format (default: from the file extension)")
    p.add_argument("--replicas", type=POSITIVE, default=1, help="model replicas (Ray actors) (default: 1)")
    p.add_argument("--gpus-per-replica", type=NON_NEGATIVE_NUMBER, default=0,
                   help="GPUs per replica: 0 runs on CPU, 1 gives each replica its own GPU (default: 0)")
    p.add_argument("--cpus-per-replica", type=POSITIVE_NUMBER, default=None,
                   help="CPUs (and torch threads) per replica (default: an equal share of the cluster's CPUs)")
    p.add_argument("--batch-tokens", "--max-batch-tokens", dest="batch_tokens", type=POSITIVE, default=None,
                   help="token budget of one packed batch (default: the model's, 8192 on CPU, 65536 on GPU)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, fp16 on GPU)")
    p.add_argument("--task", default=None,
                   help="models with task adapters (jina-embeddings-v3): the task to embed with "
                        "(e.g. retrieval.passage)")
    p.add_argument("--prompt-name", default=None,
                   help="a prompt of the model folder's (config_sentence_transformers.json), e.g. document")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize embeddings (default: as the model folder says)")
    p.add_argument("--no-truncate", action="store_true", help="fail on over-long texts instead of truncating")
    p.add_argument("--rows-per-shard", type=POSITIVE, default=10_000,
                   help="rows per shard, the unit of work, retry and resume (default: 10000)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto' or ray://host:port); default: start a local Ray on this machine")
    p.add_argument("--overwrite", action="store_true", help="recompute everything, deleting earlier part files")
    p.add_argument("--shards-per-replica", type=POSITIVE, default=None,
                   help="shards each replica works on at once: on a GPU one runs on the device while others are "
                        "read, tokenized and written (default: 3 with GPUs, 1 on CPU)")
    p.add_argument("--max-retries", type=NON_NEGATIVE, default=3, help="retries of a failed shard (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON to this file")
    return p


def run(args) -> int:
    from ..ray import embed_dataset, require_ray

    try:
        require_ray()
    except ImportError as e:
        print(f"packformer embed-dataset: error: {e}", file=sys.stderr)
        return 1
    out, summary = embed_dataset(
        args.input, args.output, args.model, text_column=args.text_column, id_column=args.id_column,
        format=args.format, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica, batch_tokens=args.batch_tokens, dtype=args.dtype,
        normalize=args.normalize, task=args.task, prompt_name=args.prompt_name, truncate=not args.no_truncate,
        rows_per_shard=args.rows_per_shard, ray_address=args.ray_address, overwrite=args.overwrite,
        max_retries=args.max_retries,
        progress=not args.no_progress, shards_per_replica=args.shards_per_replica)
    print(f"packformer embed-dataset: {summary}", file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_dict(), f, indent=1)
    return 0
