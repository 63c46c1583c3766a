"""Profiles: torch profiler tables (top operators by self time) for one batch, per peer, and a Chrome
trace on request. The same helper prints the per-run tables of `packformer tutorial`."""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..runtime import resolve_device
from .timing import synchronize


@dataclass
class Profile:
    table: str                                   # torch's own table, as printed
    top_ops: list[dict] = field(default_factory=list)
    op_names: set[str] = field(default_factory=set)
    sort_by: str = ""

    def to_dict(self) -> dict:
        return {"sort_by": self.sort_by, "top_ops": self.top_ops}


def profile_calls(fn: Callable[[], Any], device: torch.device | str, iterations: int = 1, top: int = 15,
                  trace: str | Path | None = None, context: Callable[[], Any] | None = None) -> Profile:
    """Profile `iterations` calls of `fn` (inside `context()`, e.g. torch.no_grad). Sorted by self device
    time on CUDA, self CPU time on CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ctx = context or contextlib.nullcontext
    synchronize(device)
    with profile(activities=acts) as prof:
        with ctx():
            for _ in range(iterations):
                fn()
        synchronize(device)
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ka = prof.key_averages()
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(ka, key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    top_ops = [{"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 4),
                "self_device_ms": round(e.self_device_time_total / 1e3, 4) if cuda else None,
                "self_pct": round(100 * key(e) / total, 2)} for e in events[:top]]
    return Profile(table=ka.table(sort_by=sort_by, row_limit=top), top_ops=top_ops,
                   op_names={e.key for e in events}, sort_by=sort_by)


def run_profile(model: str | Path | None = None, device: str = "cpu", dtype: str | None = None,
                workload: str = "serve_b32", peers: Sequence[str] | str = ("packformer",), iterations: int = 3,
                warmup: int = 1, top: int = 25, trace: str | Path | None = None, batch_size: int = 32,
                log: Callable[[str], None] | None = print) -> dict:
    """Profile one batch of `workload` through each of `peers`; print their tables; return a dict.
    `trace`: a Chrome trace path (with several peers, the peer's name is added before the suffix)."""
    from . import peers as P
    from .report import machine_info
    from .run import _inputs, bench_dtype, load_source, make_workloads

    log = log or (lambda s: None)
    dev = resolve_device(device)
    parts = load_source(model)
    dt = bench_dtype(parts, dev, dtype)
    (w,) = make_workloads([workload], parts)
    inputs = _inputs(w, parts, dev, batch_size)
    names = P.canonical_peers(peers) or ["packformer"]
    result: dict = {"schema": "packformer.profile/1", "machine": machine_info(dev), "model": parts.source,
                    "device": str(dev), "dtype": str(dt).replace("torch.", ""), "workload": w.describe(),
                    "iterations": iterations, "peers": {}}
    with tempfile.TemporaryDirectory(prefix="packformer-profile-") as tmp:
        ctx = P.PeerContext(parts=parts, device=dev, dtype=dt, workdir=Path(tmp), threads=torch.get_num_threads())
        for name in names:
            why = P.unavailable(name, dev)
            if why:
                log(f"skipped {name}: {why}")
                result["peers"][name] = {"status": "skipped", "reason": why}
                continue
            with P.built(name, ctx) as eng:
                try:
                    fn = eng.prepare(inputs)
                except P.NotApplicable as e:
                    log(f"skipped {name}: {e}")
                    result["peers"][name] = {"status": "skipped", "reason": str(e)}
                    continue
                for _ in range(warmup):
                    fn()
                path = None
                if trace:
                    t = Path(trace)
                    path = t if len(names) == 1 else t.with_name(f"{t.stem}.{name}{t.suffix or '.json'}")
                prof = profile_calls(fn, dev, iterations, top, path)
            log(f"\n{name} - {w.name} ({w.num_seqs} seqs, {w.real_tokens} tokens), {iterations} call(s), "
                f"{eng.notes}\n{prof.table}")
            if path:
                log(f"Chrome trace: {path}")
            result["peers"][name] = {"status": "ok", "notes": eng.notes, **prof.to_dict(),
                                     "trace": str(path) if path else None}
    return result
