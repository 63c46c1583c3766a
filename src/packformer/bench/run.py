"""`run_bench`: every requested peer on every requested workload, against the GEMM floor and the fp32
reference, in one process and one run (only ratios taken in one run are comparable)."""
from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine import Model
from ..loaders.parts import ModelParts
from ..families import model_dtype
from ..runtime import DEFAULT_MAX_BATCH_TOKENS, is_fp8, plan_chunks, resolve_device
from . import peers as P
from .compare import compare
from .floor import GemmFloor
from .timing import measure
from .workloads import TEXT_WORKLOADS, Workload, build_workload, read_texts_file

SCHEMA = "packformer.bench/1"


def load_source(model: str | Path | ModelParts | None) -> ModelParts:
    """fp32 CPU weights to build every peer from (a path, 'random:<preset>', None = built-in, or parts)."""
    if isinstance(model, ModelParts):
        parts = model
    else:
        from ..loading import load_parts
        parts = load_parts(model)
    parts.encoder.float().eval().requires_grad_(False)
    if parts.head is not None:
        parts.head.float().eval().requires_grad_(False)
    return parts


def make_workloads(names: Sequence[str], parts: ModelParts, texts: list[str] | None = None,
                   texts_name: str = "texts") -> list[Workload]:
    out = []
    for n in names:
        if n in TEXT_WORKLOADS:
            out.append(build_workload(n, parts.config, max_len=parts.max_seq_length, tokenizer=parts.tokenizer))
        else:
            out.append(build_workload(n, parts.config))
    if texts is not None:
        out.append(build_workload(texts_name, parts.config, max_len=parts.max_seq_length, tokenizer=parts.tokenizer,
                                  texts=texts))
    if not out:
        raise ValueError("no workloads: name at least one (e.g. serve_b32) or pass texts")
    return out


def _inputs(w: Workload, parts: ModelParts, device: torch.device, batch_size: int):
    if w.is_text:
        return P.TextInputs(texts=w.texts, batch_size=batch_size)
    padded, mask = w.padded(parts.config.pad_token_id)
    return P.IdInputs(padded=padded.to(device), mask=mask.to(device), packed=w.packed(parts.config.position_offset),
                      padded_cpu=padded, mask_cpu=mask)


def _floor_counts(w: Workload, device: torch.device, batch_size: int) -> tuple[list[int], list[int]]:
    """Token counts per GEMM pass: real (packformer's chunks) and padded (B x L per padded batch)."""
    if not w.is_text:
        return [w.real_tokens], [w.padded_tokens()]
    chunks = plan_chunks(w.lengths, DEFAULT_MAX_BATCH_TOKENS[device.type])
    real = [sum(w.lengths[i] for i in c) for c in chunks]
    padded = [len(w.lengths[i:i + batch_size]) * max(w.lengths[i:i + batch_size])
              for i in range(0, len(w.lengths), batch_size)]
    return real, padded


def run_bench(model: str | Path | ModelParts | None = None, workloads: Sequence[str] | str = ("serve_b32",),
              peers: Sequence[str] | str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
              texts: list[str] | str | Path | None = None, iterations: int = 10, warmup: int | None = None,
              max_seconds: float | None = None, batch_size: int = 32, floor: bool = True,
              threads: int | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Benchmark packformer against `peers` on `workloads`; returns the result as a JSON-ready dict.

    model: a folder, 'random:<preset>', None (built-in all-MiniLM-L6-v2) or ModelParts.
    workloads: standard batches (tutorial_small, tutorial_big, serve_b32, offline_b256, offline_b128,
      query_b32, query_b1)
      and/or text workloads (texts_1500, texts_20000); texts: a list or a file of one text per line.
    peers: names or aliases (see peers.PEERS); None = the device's default set. packformer always runs.
    warmup: calls before timing (default 1 on CPU, 3 on CUDA); max_seconds: stop a peer's timed calls
      early (after 3) once they took this long. batch_size: sequences per padded batch on text workloads.
    threads: torch's (and ONNX Runtime's) CPU threads for this run (default: torch's current setting).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_bench(model, workloads, peers, device, dtype, texts, iterations, warmup, max_seconds,
                             batch_size, floor, None, log)
        finally:
            torch.set_num_threads(before)
    log = log or (lambda s: None)
    dev = resolve_device(device)
    warmup = (3 if dev.type == "cuda" else 1) if warmup is None else warmup
    if isinstance(workloads, str):
        workloads = [w.strip() for w in workloads.split(",") if w.strip()]
    texts_name = "texts"
    if isinstance(texts, (str, Path)):
        texts_name = f"texts:{Path(texts).name}"
        texts = read_texts_file(texts)
    parts = load_source(model)
    dt = bench_dtype(parts, dev, dtype)
    wls = make_workloads(list(workloads), parts, texts, texts_name)
    names = P.resolve_peers(peers, dev)
    from .report import machine_info

    result: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(dev),
                    "model": _model_info(parts), "device": str(dev), "dtype": str(dt).replace("torch.", ""),
                    "iterations": iterations, "warmup": warmup, "max_seconds": max_seconds,
                    "text_batch_size": batch_size, "peers_requested": names,
                    "peer_packages": P.package_versions(names), "workloads": []}
    log(f"packformer bench: {parts.source} on {dev} ({result['dtype']}), {len(wls)} workload(s), "
        f"peers: {', '.join(names)}")
    inputs = {w.name: _inputs(w, parts, dev, batch_size) for w in wls}
    entries = {w.name: {**w.describe(batch_size if w.is_text else None), "peers": {}, "floor": None} for w in wls}

    # 1. the fp32 reference (packformer's readable model.py), once per workload, untimed
    ref_model = Model(dataclasses.replace(parts, encoder=copy.deepcopy(parts.encoder), head=None), device=dev,
                      dtype=torch.float32, fast=False)
    refs = {}
    for w in wls:
        eng = P.PackformerEngine(ref_model, "reference")
        refs[w.name] = eng.result(eng.prepare(inputs[w.name])(), inputs[w.name])
    del ref_model, eng
    _free(dev)

    # 2. the GEMM floor on real and padded token counts
    if floor:
        gf = GemmFloor(parts.encoder, dev, dt)
        for w in wls:
            real, padded = _floor_counts(w, dev, batch_size)
            f = {}
            for kind, counts in (("real", real), ("padded", padded)):
                runner = gf.runner(counts)
                t, _ = measure(runner, dev, iterations, warmup, max_seconds)
                f[kind] = {"tokens": sum(counts), "passes": len(counts), "cuda_graph": dev.type == "cuda",
                           "timing": t.to_dict(),
                           "tflops": round(gf.flops(sum(counts)) / (t.median_ms * 1e-3) / 1e12, 3),
                           "backends": dict(gf.backends)}     # per GEMM role: cublas, or mkl / onednn on a CPU
            entries[w.name]["floor"] = f
            log(f"  floor                 {w.name:<14} real {f['real']['timing']['median_ms']:10.2f} ms   "
                f"padded {f['padded']['timing']['median_ms']:10.2f} ms")
        del gf
        _free(dev)

    # 3. the peers, one at a time (only one peer's weights on the device at once)
    with tempfile.TemporaryDirectory(prefix="packformer-bench-") as tmp:
        ctx = P.PeerContext(parts=parts, device=dev, dtype=dt, workdir=Path(tmp), threads=torch.get_num_threads(),
                            batch_size=batch_size)
        for name in names:
            why = P.unavailable(name, dev)
            if why:
                log(f"  skipped {name}: {why}")
                for w in wls:
                    entries[w.name]["peers"][name] = {"status": "skipped", "reason": why}
                continue
            try:
                with P.built(name, ctx) as eng:
                    for w in wls:
                        entries[w.name]["peers"][name] = _run_peer(eng, w, inputs[w.name], refs[w.name], dev,
                                                                   iterations, warmup, max_seconds, log)
            except P.NotApplicable as e:
                log(f"  skipped {name}: {e}")
                for w in wls:
                    entries[w.name]["peers"].setdefault(name, {"status": "skipped", "reason": str(e)})
            except Exception as e:  # a broken peer is reported, and the others still run
                msg = f"{type(e).__name__}: {e}"
                log(f"  FAILED {name}: {msg}")
                for w in wls:
                    entries[w.name]["peers"].setdefault(name, {"status": "failed", "error": msg})
            _free(dev)

    for w in wls:
        _ratios(entries[w.name])
        result["workloads"].append(entries[w.name])
    return result


def bench_dtype(parts: ModelParts, dev: torch.device, dtype) -> torch.dtype:
    """The dtype bench and profile run (None: the family's GPU default, bf16 for decoder families); fp8 is
    refused here: it is a peer (packformer_fp8), measured against the fp16 floor."""
    if is_fp8(dtype):
        raise ValueError("fp8 is measured as a peer against the fp16 floor: pass --peers packformer,packformer_fp8 "
                         "and leave --dtype at the model's half precision")
    return model_dtype(parts.config, dev, dtype)


def _run_peer(eng: P.Engine, w: Workload, inputs, ref: torch.Tensor, dev: torch.device, iterations: int,
              warmup: int, max_seconds: float | None, log) -> dict:
    try:
        fn = eng.prepare(inputs)
    except P.NotApplicable as e:
        log(f"  skipped {eng.name} on {w.name}: {e}")
        return {"status": "skipped", "reason": str(e)}
    try:
        t, raw = measure(fn, dev, iterations, warmup, max_seconds)
        out = eng.result(raw, inputs)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        log(f"  FAILED {eng.name} on {w.name}: {msg}")
        return {"status": "failed", "error": msg}
    del raw
    against = torch.nn.functional.normalize(ref, dim=-1) if eng.unit_norm and w.is_text else ref
    agree = compare(out, against, eng.dtype, "sequence" if w.is_text else "token", int8=eng.int8,
                    quantized=eng.quantized)
    if against is not ref:
        agree["reference"] = "L2-normalized (the peer always normalizes)"
    entry = {"status": "ok", "dtype": str(eng.dtype).replace("torch.", ""), "notes": eng.notes,
             "timing": t.to_dict(), "tokens_per_s": round(w.real_tokens / (t.median_ms * 1e-3), 1),
             "agreement": agree}
    mem = f"  peak {t.peak_mem_mb:8.1f} MB" if t.peak_mem_mb is not None else ""
    log(f"  {eng.name:<21} {w.name:<14} {t.median_ms:10.2f} ms ({t.runs} runs){mem}  "
        f"max|diff| {agree['max_abs_diff']:.2e}  min cos {agree['min_cosine']:.6f}"
        + ("" if agree["agrees"] else f"  (outside {agree['criterion']})"))
    return entry


def _ratios(entry: dict) -> None:
    """speedup_of_packformer = peer median / packformer median; x_floor_* = median / floor median."""
    pf = entry["peers"].get("packformer", {})
    pf_ms = pf.get("timing", {}).get("median_ms") if pf.get("status") == "ok" else None
    fl = entry.get("floor") or {}
    for name, p in entry["peers"].items():
        if p.get("status") != "ok":
            continue
        ms = p["timing"]["median_ms"]
        p["speedup_of_packformer"] = _sig(ms / pf_ms) if pf_ms else None
        for kind in ("real", "padded"):
            if kind in fl:
                p[f"x_floor_{kind}"] = _sig(ms / fl[kind]["timing"]["median_ms"])


def _model_info(parts: ModelParts) -> dict:
    c = parts.config
    return {"source": parts.source, "format": parts.format, "model_type": c.model_type, "layers": c.num_layers,
            "hidden": c.hidden_size, "heads": c.num_heads, "ffn": c.intermediate_size, "vocab": c.vocab_size,
            "pad_token_id": c.pad_token_id, "max_seq_length": parts.max_seq_length, "pooling": parts.pooler.mode,
            "weights": "random" if parts.format == "random" else "loaded"}


def _free(dev: torch.device) -> None:
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _sig(x: float) -> float:
    """6 significant digits: ratios span 0.001 to 1000, so a fixed number of decimals would lose them."""
    return float(f"{x:.6g}")
