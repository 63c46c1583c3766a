"""Profiles: torch profiler tables (top operators by self time) for one batch, per peer, and a Chrome
trace on request; with `breakdown`, where a forward's time goes by kernel category, against the GEMM
floor profiled the same way. The same helper prints the per-run tables of `packformer tutorial`."""
from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..runtime import resolve_device
from .timing import measure, synchronize

# What a kernel (CUDA) or an aten op (CPU) does, coarsely enough to compare engines:
#   gemm        library matrix multiplies: cuBLAS / cuBLASLt (sm90_xmma_gemm_*, nvjet_*, splitKreduce),
#               CUTLASS, aten mm / addmm / bmm / linear, oneDNN linears (mkldnn::_linear_pointwise,
#               onednn::qlinear_pointwise); a peer's attention batched GEMMs land here too
#   gemm_fp8    the fp8 GEMM kernel of ops/fp8.py; a library GEMM on fp8 inputs (e4m3 / e5m2 in its name,
#               nvjet_*_qq*: what torch._scaled_mm runs on an H200)
#   gemm_act    a GEMM with a bias + activation epilogue: ops/linear_act.py, cuBLASLt's *gelubias* / relu
#   attention   flash / varlen / disentangled attention, SDPA, fmha, softmax
#   norm        (add +) layer norm / RMS norm
#   activation  bias + activation, GLU, standalone GELU / ReLU / SiLU
#   quantize    per-token fp8 / int8 quantization of activations
#   rotary      rotary position embeddings (with QK norm)
#   embedding   the embedding lookup (and the index_select under aten::embedding)
#   copy        memcpy / memset, copy kernels, aten::copy_
#   other       everything else (elementwise adds, reductions, host-side aten bookkeeping on a CPU)
CATEGORIES = ("gemm", "gemm_fp8", "gemm_act", "attention", "norm", "activation", "quantize", "rotary", "embedding",
              "copy", "other")
GEMM_CATEGORIES = ("gemm", "gemm_fp8", "gemm_act")

# this repository's Triton kernels: their @triton.jit function names are the kernel names
TRITON_KERNELS = {
    "_fp8_gemm_kernel": "gemm_fp8",
    "_linear_act_kernel": "gemm_act", "_linear_act_tma_kernel": "gemm_act",
    "_flash_varlen_kernel": "attention", "_disentangled_kernel": "attention",
    "_add_layernorm_kernel": "norm", "_add_rmsnorm_kernel": "norm",
    "_bias_act_kernel": "activation", "_glu_kernel": "activation",
    "_quantize_rows_kernel": "quantize",
    "_rotary_kernel": "rotary", "_qk_norm_rotary_kernel": "rotary",
    "_embed_kernel": "embedding",
}

# first match wins: attention before gemm (fmha_cutlass*, cudnn's sdpa_sm90_*), gemm before activation
# (nvjet_*_gelubias_*)
_RULES = [(c, re.compile(p)) for c, p in (
    ("copy", r"^memcpy|^memset|copy_kernel|^aten::(copy_|clone|contiguous)$"),
    ("attention", r"attention|flash|fmha|sdpa|softmax"),
    ("gemm", r"gemm|gemv|xmma|nvjet|cutlass|cublas|matmul|linear|(^|[:_])(add|addb|baddb|b)?mm(_|$)"),
    ("norm", r"layer_?norm|rms_?norm"),
    ("activation", r"gelu|relu|silu|swish|glu|tanh|sigmoid"),
    ("quantize", r"quantize"),
    ("rotary", r"rotary|rope"),
    ("embedding", r"embedding|index_?select"),
)]
_FP8 = re.compile(r"e4m3|e5m2|fp8|scaled_mm|^nvjet_(sm\d+_)?qq")     # nvjet's type code: qq = e4m3 inputs
_ACT_EPILOGUE = re.compile(r"gelu|relu|silu")


def kernel_category(name: str) -> str:
    """The category (one of CATEGORIES) of a profiler event: a CUDA kernel's name or a CPU aten op's."""
    name = name.strip()
    if name in TRITON_KERNELS:
        return TRITON_KERNELS[name]
    low = name.lower()
    cat = next((c for c, rx in _RULES if rx.search(low)), "other")
    if cat == "gemm" and _FP8.search(low):
        return "gemm_fp8"
    if cat == "gemm" and _ACT_EPILOGUE.search(low):
        return "gemm_act"           # a library GEMM with an activation epilogue (cuBLASLt's *_gelubias_*)
    return cat


@dataclass
class Profile:
    table: str                                   # torch's own table, as printed
    top_ops: list[dict] = field(default_factory=list)
    op_names: set[str] = field(default_factory=set)
    sort_by: str = ""
    categories: dict[str, float] = field(default_factory=dict)  # ms per call by category: CUDA kernel time
                                                                # on a GPU, self CPU time on a CPU
    kernels: list[dict] = field(default_factory=list)           # the top kernels: name, category, calls, ms
                                                                # (calls and ms per call)

    def to_dict(self) -> dict:
        return {"sort_by": self.sort_by, "top_ops": self.top_ops, "categories": self.categories,
                "kernels": self.kernels}


def _leaf_times(events, cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of the events that hold time of their own, each counted once: on CUDA
    the device's kernels, memcpys and memsets (not the aten ops that launched them, whose self device
    time is the same kernels again); on a CPU every op's self time."""
    if not cuda:
        return [(e.key, e.count, e.self_cpu_time_total) for e in events]
    return [(e.key, e.count, e.self_device_time_total) for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def _categorize(leaves: list[tuple[str, int, float]], iterations: int, top: int) -> tuple[dict, list[dict]]:
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for name, _, us in leaves:
        cats[kernel_category(name)] += us
    cats = {c: round(us / 1e3 / iterations, 4) for c, us in cats.items()}
    ranked = sorted(leaves, key=lambda x: x[2], reverse=True)[:top]
    kernels = [{"name": n, "category": kernel_category(n), "calls": round(k / iterations, 2),
                "ms": round(us / 1e3 / iterations, 4)} for n, k, us in ranked]
    return cats, kernels


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
    categories, kernels = _categorize(_leaf_times(events, cuda), iterations, top)
    return Profile(table=ka.table(sort_by=sort_by, row_limit=top), top_ops=top_ops,
                   op_names={e.key for e in events}, sort_by=sort_by, categories=categories, kernels=kernels)


FLOOR = "floor"     # not a peer of the bench (which times the floor itself): profiled here on request
FLOOR_FP8 = "floor_fp8"   # the same GEMMs in e4m3 on pre-quantized inputs: the floor of dtype="float8"
FLOORS = (FLOOR, FLOOR_FP8)
WALL_CALLS = 5      # timed calls, without the profiler, behind each peer's wall time in a breakdown


class FloorEngine:
    """The GEMM floor (floor.py) as a profiled peer: the four GEMMs per layer on the workload's real
    token counts, launched eagerly so that each GEMM is a kernel of its own in the profile (fp8: in e4m3)."""

    def __init__(self, parts, device: torch.device, dtype: torch.dtype, token_counts: Sequence[int],
                 fp8: bool = False):
        from .floor import GemmFloor

        self.name = FLOOR_FP8 if fp8 else FLOOR
        self.floor, self.counts = GemmFloor(parts.encoder, device, dtype, fp8=fp8), list(token_counts)
        self.notes = ""

    def prepare(self, inputs) -> Callable[[], torch.Tensor]:
        run = self.floor.runner(self.counts, graph=False)
        backends = ", ".join(sorted(set(self.floor.backends.values())))
        kind = "GEMM floor (e4m3)" if self.floor.fp8 else "GEMM floor"
        self.notes = (f"{kind}: {4 * len(self.floor.layers)} GEMMs ({backends}) per pass, {len(self.counts)} "
                      f"pass(es) of {sum(self.counts)} real tokens, eager")
        return run

    def close(self) -> None:
        self.floor = None


def _peer_names(peers: Sequence[str] | str) -> list[str]:
    """Canonical peer names, in order, with `floor` kept as it is (default: packformer)."""
    from . import peers as P

    if isinstance(peers, str):
        peers = [n.strip() for n in peers.split(",") if n.strip()]
    out: list[str] = []
    for n in peers:
        n = n if n in FLOORS else P.canonical_peers([n])[0]
        if n not in out:
            out.append(n)
    return out or ["packformer"]


@contextlib.contextmanager
def _built(name: str, ctx, floor_counts: Sequence[int]):
    from . import peers as P

    if name not in FLOORS:
        with P.built(name, ctx) as eng:
            yield eng
        return
    eng = FloorEngine(ctx.parts, ctx.device, ctx.dtype, floor_counts, fp8=name == FLOOR_FP8)
    try:
        yield eng
    finally:
        eng.close()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def run_without_graphs(engine) -> bool:
    """Give a packformer peer back the eager runner that its CUDA graphs wrap (what
    FastOptions(graphs=False) builds), so that each kernel shows in the profile. -> whether it had graphs."""
    from ..fast.graphs import GraphRunner

    model = getattr(engine, "model", None)
    runner = getattr(model, "runner", None)
    if not isinstance(runner, GraphRunner):
        return False
    model.runner = runner.forward
    engine.notes += ", eager (CUDA graphs off)"
    return True


def gemm_ms(categories: dict[str, float]) -> float:
    return sum(categories.get(c, 0.0) for c in GEMM_CATEGORIES)


def run_profile(model: str | Path | None = None, device: str = "cpu", dtype: str | None = None,
                workload: str = "serve_b32", peers: Sequence[str] | str = ("packformer",), iterations: int = 3,
                warmup: int = 1, top: int = 25, trace: str | Path | None = None, batch_size: int = 32,
                breakdown: bool = False, eager: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Profile one batch of `workload` through each of `peers`; print their tables; return a dict.
    `peers` may name `floor`: the GEMM floor on the workload's real token counts, eager (`floor_fp8`: the
    same GEMMs in e4m3).
    `trace`: a Chrome trace path (with several peers, the peer's name is added before the suffix).
    `breakdown`: also time each peer without the profiler and add `breakdown` (ms per forward by
    kernel category), `wall_ms` and `x_floor_gemm` (GEMM time over the floor's, when it ran) to the result.
    `eager`: packformer peers run without CUDA graphs, so the profile shows their kernels one by one."""
    from . import peers as P
    from .report import machine_info
    from .run import _floor_counts, _inputs, bench_dtype, load_source, make_workloads

    log = log or (lambda s: None)
    dev = resolve_device(device)
    parts = load_source(model)
    dt = bench_dtype(parts, dev, dtype)
    (w,) = make_workloads([workload], parts)
    inputs = _inputs(w, parts, dev, batch_size)
    names = _peer_names(peers)
    floor_counts = _floor_counts(w, dev, batch_size)[0]         # the real tokens per GEMM pass, for `floor`
    result: dict = {"schema": "packformer.profile/1", "machine": machine_info(dev), "model": parts.source,
                    "device": str(dev), "dtype": str(dt).replace("torch.", ""), "workload": w.describe(),
                    "iterations": iterations, "eager": eager, "peers": {}}
    with tempfile.TemporaryDirectory(prefix="packformer-profile-") as tmp:
        ctx = P.PeerContext(parts=parts, device=dev, dtype=dt, workdir=Path(tmp), threads=torch.get_num_threads())
        for name in names:
            why = None if name in FLOORS else P.unavailable(name, dev)
            if why:
                log(f"skipped {name}: {why}")
                result["peers"][name] = {"status": "skipped", "reason": why}
                continue
            with _built(name, ctx, floor_counts) as eng:
                try:
                    fn = eng.prepare(inputs)
                except P.NotApplicable as e:
                    log(f"skipped {name}: {e}")
                    result["peers"][name] = {"status": "skipped", "reason": str(e)}
                    continue
                if eager and dev.type == "cuda":
                    run_without_graphs(eng)
                for _ in range(warmup):
                    fn()
                path = None
                if trace:
                    t = Path(trace)
                    path = t if len(names) == 1 else t.with_name(f"{t.stem}.{name}{t.suffix or '.json'}")
                prof = profile_calls(fn, dev, iterations, top, path)
                wall = measure(fn, dev, WALL_CALLS, warmup=0)[0].median_ms if breakdown else None
            log(f"\n{name} - {w.name} ({w.num_seqs} seqs, {w.real_tokens} tokens), {iterations} call(s), "
                f"{eng.notes}\n{prof.table}")
            if path:
                log(f"Chrome trace: {path}")
            result["peers"][name] = {"status": "ok", "notes": eng.notes, **prof.to_dict(),
                                     "trace": str(path) if path else None}
            if wall is not None:
                result["peers"][name]["wall_ms"] = round(wall, 4)
    if breakdown:
        result.update(breakdown_of(result["peers"]))
    return result


def breakdown_of(peers: dict) -> dict:
    """From the peers' entries of a result: `breakdown` {peer: {category: ms}}, `wall_ms` {peer: ms} and,
    when the floor ran, `x_floor_gemm` {peer: (gemm + gemm_fp8 + gemm_act) / the floor's gemm time}."""
    ok = {n: p for n, p in peers.items() if p["status"] == "ok"}
    out: dict = {"breakdown": {n: p["categories"] for n, p in ok.items()},
                 "wall_ms": {n: p.get("wall_ms") for n, p in ok.items()}}
    floor = gemm_ms(ok[FLOOR]["categories"]) if FLOOR in ok else 0.0
    if floor > 0:
        out["x_floor_gemm"] = {n: round(gemm_ms(c) / floor, 3) for n, c in out["breakdown"].items()}
    return out
