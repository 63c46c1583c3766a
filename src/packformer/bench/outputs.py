"""Sparse and multi-vector measurements, reached by `packformer bench --workloads sparse|bge_m3`:

- `sparse`: packformer's SPLADE encode against sentence-transformers' SparseEncoder.encode on the same
  texts and folder (a SparseEncoder folder, or a random masked-LM BERT of a preset's shape saved as one),
  results checked against each other.
- `bge_m3`: on a bge-m3 folder, encode_all (dense + lexical weights + ColBERT, one forward) against dense
  encode alone (the extra heads should cost at most ~15%) and against FlagEmbedding's
  BGEM3FlagModel.encode(return_dense, return_sparse, return_colbert_vecs), results checked.
"""
from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .timing import measure
from .workloads import generate_texts, read_texts_file

OUTPUT_WORKLOADS = ("sparse", "bge_m3")
FLAG_STUB = "transformers.modeling_attn_mask_utils"


def random_splade_folder(preset: str, folder: Path) -> Path:
    """A SparseEncoder folder (MLMTransformer + SpladePooling max) of a BERT preset's shape, random weights,
    with the built-in WordPiece tokenizer."""
    import transformers
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    from .. import families  # noqa: F401  (registers the presets)
    from ..config import preset as get_preset
    from ..loading import builtin_model_dir

    c = get_preset(preset)
    if c.vocab_size != 30522:
        raise ValueError(f"the random SPLADE folder needs a BERT-vocabulary preset (bert-base, minilm-l6 ...), "
                         f"got {preset!r}")
    cfg = transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                  num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                  max_position_embeddings=c.max_position_embeddings)
    torch.manual_seed(0)
    mlm = folder / "mlm"
    transformers.BertForMaskedLM(cfg).save_pretrained(str(mlm))
    transformers.BertTokenizerFast.from_pretrained(str(builtin_model_dir())).save_pretrained(str(mlm))
    SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling("max")]).save(str(folder / "splade"))
    return folder / "splade"


def bgem3_flag_model():
    """FlagEmbedding's BGEM3FlagModel. Its package root imports decoder-only rerankers that import
    transformers.modeling_attn_mask_utils, gone in transformers 5; BGEM3FlagModel never uses it, so a stub
    module stands in for it where it is missing."""
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ImportError:
        stub = types.ModuleType(FLAG_STUB)

        def placeholder(name):
            def fail(*a, **k):
                raise RuntimeError(f"{FLAG_STUB}.{name} is a stub (transformers 5 removed the module)")
            return type(name, (), {"__init__": fail, "__call__": fail})
        stub.__getattr__ = placeholder
        sys.modules[FLAG_STUB] = stub
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel


def _timed(name: str, fn: Callable[[], Any], tokens: int, device, iterations: int, warmup: int,
           max_seconds: float | None) -> tuple[dict, Any]:
    t, out = measure(fn, device, iterations=iterations, warmup=warmup, max_seconds=max_seconds)
    return {"name": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "runs": t.runs,
            "tokens_per_s": tokens / (t.median_ms / 1e3)}, out


def bench_sparse(folder: str | Path, texts: list[str], device: str = "cpu", batch_size: int = 32,
                 iterations: int = 5, warmup: int = 1, max_seconds: float | None = 60.0) -> dict:
    from sentence_transformers import SparseEncoder

    from ..loading import load

    model = load(folder, device=device, dtype="float32")
    ref = SparseEncoder(str(folder), device=device)
    tokens = sum(map(len, model.token_ids(texts)))
    ours, got = _timed("packformer", lambda: model.encode(texts), tokens, device, iterations, warmup, max_seconds)
    theirs, want = _timed("sentence-transformers", lambda: ref.encode(texts, batch_size=batch_size), tokens,
                          device, iterations, warmup, max_seconds)
    diff = (got.to_dense().cpu() - want.to_dense().cpu()).abs().max().item()
    return {"workload": "sparse", "texts": len(texts), "tokens": tokens, "results": [ours, theirs],
            "speedup": theirs["median_ms"] / ours["median_ms"], "max_abs_diff": diff, "agrees": diff <= 1e-3}


def bench_bge_m3(folder: str | Path, texts: list[str], device: str = "cpu", batch_size: int = 32,
                 iterations: int = 5, warmup: int = 1, max_seconds: float | None = 60.0, peer: bool = True) -> dict:
    from ..loading import load

    model = load(folder, device=device, dtype="float32")
    tokens = sum(map(len, model.token_ids(texts)))
    dense, _ = _timed("packformer dense", lambda: model.encode(texts), tokens, device, iterations, warmup, max_seconds)
    three, out = _timed("packformer encode_all", lambda: model.encode_all(texts), tokens, device, iterations,
                        warmup, max_seconds)
    res = {"workload": "bge_m3", "texts": len(texts), "tokens": tokens, "results": [dense, three],
           "all_over_dense": three["median_ms"] / dense["median_ms"]}
    if peer:
        ref = bgem3_flag_model()(str(folder), use_fp16=False, devices=device,
                                 colbert_dim=out.colbert[0].shape[1] if out.colbert else -1)
        kw = dict(batch_size=batch_size, max_length=model.max_seq_length, return_dense=True, return_sparse=True,
                  return_colbert_vecs=True)
        flag, want = _timed("FlagEmbedding BGEM3FlagModel", lambda: ref.encode(texts, **kw), tokens, device,
                            iterations, warmup, max_seconds)
        res["results"].append(flag)
        res["speedup"] = flag["median_ms"] / three["median_ms"]
        d_dense = float(np.abs(out.dense - want["dense_vecs"]).max())
        d_colbert = max(float(np.abs(a - b).max()) for a, b in zip(out.colbert, want["colbert_vecs"]))
        same_ids = all(o.keys() == {int(k) for k in w} for o, w in zip(out.sparse, want["lexical_weights"]))
        d_sparse = max((abs(o[int(k)] - float(v)) for o, w in zip(out.sparse, want["lexical_weights"])
                        for k, v in w.items() if int(k) in o), default=0.0)
        res.update(max_abs_diff={"dense": d_dense, "sparse": d_sparse, "colbert": d_colbert}, same_token_ids=same_ids,
                   agrees=same_ids and max(d_dense, d_sparse, d_colbert) <= 1e-3)
    return res


def serve_sparse(args) -> int:
    """bench-serve --sparse: latency and tokens/s of packformer serve's POST /embed_sparse, one generated text
    per request (as the embedding bench-serve), at the requested concurrencies."""
    from ..loading import load
    from .loadgen import drive_server

    texts = generate_texts(args.num_texts or 2000, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="packformer-sparse-") as tmp:
        folder = args.model
        if folder is None or str(folder).startswith("random:"):
            folder = random_splade_folder(str(folder or "random:bert-base").split(":", 1)[1], Path(tmp))
        model = load(folder)
        tokens = [len(ids) for ids in model.token_ids(texts)]
        del model
        bodies = [{"inputs": [t], "truncate": True} for t in texts]        # cut as token_ids counted them
        drive_server(str(folder), "/embed_sparse", bodies, tokens, args,
                     {"mode": "embed_sparse", "model": str(args.model or "random:bert-base")})
    return 0


def run_output_bench(args) -> int:
    """`packformer bench MODEL --workloads sparse|bge_m3 [--texts FILE] [--device] [--batch-size] [--iterations]`.
    sparse without a SparseEncoder folder builds a random one of the preset's shape (MODEL 'random:<preset>')."""
    import json

    texts = read_texts_file(args.texts) if args.texts else generate_texts(1500)
    it, warm = args.iterations, args.warmup if args.warmup is not None else 1
    ms = args.max_seconds or None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            if name == "sparse":
                folder = args.model
                if folder is None or str(folder).startswith("random:"):
                    folder = random_splade_folder(str(folder or "random:bert-base").split(":", 1)[1], Path(tmp))
                results.append(bench_sparse(folder, texts, args.device, args.batch_size, it, warm, ms))
            elif name == "bge_m3":
                if args.model is None or str(args.model).startswith("random:"):
                    raise ValueError("--workloads bge_m3 needs a bge-m3 folder (sparse_linear.pt, colbert_linear.pt)")
                results.append(bench_bge_m3(args.model, texts, args.device, args.batch_size, it, warm, ms))
            else:
                raise ValueError(f"--workloads: sparse and bge_m3 run apart from the others; got {name!r}")
    from .report import machine_info

    for r in results:
        r.update(machine=machine_info(args.device), device=str(args.device))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"bench-{r['workload']}-{str(args.device).replace(':', '')}.json").write_text(
                json.dumps(r, indent=1) + "\n")
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['workload']}: {r['texts']} texts, {r['tokens']} tokens")
            for x in r["results"]:
                print(f"  {x['name']:<32} {x['median_ms']:10.1f} ms  {x['tokens_per_s']:12.0f} tokens/s  ({x['runs']} runs)")
            extra = {k: r[k] for k in ("speedup", "all_over_dense", "max_abs_diff", "agrees") if k in r}
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    return 0 if all(r.get("agrees", True) for r in results) else 1
