"""Where results go: a terminal table (rich when installed, plain text otherwise), JSON, and a
matplotlib PNG. Also the description of the machine that every recorded result carries."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch


def machine_info(device: torch.device | str = "cpu") -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..fast.cpu_features import describe_cpu

    isa = describe_cpu()
    info: dict[str, Any] = {"cpu": cpu, "cpu_family": isa["cpu_family"], "cpu_model": isa["cpu_model"],
                            "cpu_isa": isa["isa"], "isa_cap": isa["isa_cap"],
                            "aten_capability": isa["aten_capability"],
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "sentence-transformers", "onnxruntime"):   # versions without importing them
        try:
            info[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            info[dist.replace("-", "_")] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def device_label(result: dict) -> str:
    """A short name for the device a result ran on, for file names and titles."""
    m = result["machine"]
    if result["device"].startswith("cuda"):
        return m.get("gpu", "cuda")
    isa = m.get("cpu_isa")
    isa = f", {isa}{' capped' if m.get('isa_cap') else ''}" if isa else ""
    return f"{m['cpu']} ({m['torch_threads']} threads{isa})"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Print a table; numbers right-aligned. Uses rich when it is installed and the output is a terminal."""
    file = file or sys.stdout
    cells = [[_fmt(v) for v in r] for r in rows]
    try:
        if not file.isatty():
            raise ImportError
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in cells:
            t.add_row(*r)
        Console(file=file).print(t)
        return
    except ImportError:
        pass
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(title, file=file)
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))), file=file)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3:
            return f"{v:.1e}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return path


BENCH_COLUMNS = ["peer", "dtype", "ms (median)", "cpu ms", "runs", "tokens/s", "packformer speedup", "x floor real",
                 "x floor padded", "max |diff|", "min cos", "agrees", "peak MB"]


def print_bench(result: dict, file=None) -> None:
    for w in result["workloads"]:
        title = (f"{w['name']}: {w['num_seqs']} seqs, {w['real_tokens']} real / {w['padded_tokens']} padded tokens "
                 f"({100 * w['pad_fraction']:.0f}% padding) - {result['model']['source']} on {device_label(result)}, "
                 f"{result['dtype']}")
        rows = []
        fl = w.get("floor") or {}
        for kind in ("real", "padded"):
            if kind in fl:
                ms = fl[kind]["timing"]["median_ms"]
                rows.append([f"floor ({kind})", result["dtype"], ms, fl[kind]["timing"]["cpu_median_ms"],
                             fl[kind]["timing"]["runs"],
                             round(w["real_tokens"] / (ms * 1e-3)), None, None, None, None, None, None,
                             fl[kind]["timing"].get("peak_mem_mb")])
        for name, p in w["peers"].items():
            if p["status"] != "ok":
                rows.append([name, p["status"], None, None, None, None, None, None, None, None, None, None, None])
                continue
            t, a = p["timing"], p["agreement"]
            rows.append([name, p["dtype"], t["median_ms"], t["cpu_median_ms"], t["runs"], p["tokens_per_s"],
                         p.get("speedup_of_packformer"), p.get("x_floor_real"), p.get("x_floor_padded"), a["max_abs_diff"], a["min_cosine"],
                         a["agrees"], t.get("peak_mem_mb")])
        table(title, BENCH_COLUMNS, rows, file=file)
        for name, p in w["peers"].items():
            if p["status"] != "ok":
                print(f"  {name}: {p['status']}: {p.get('reason') or p.get('error')}", file=file)
        print(file=file)


def print_breakdown(result: dict, file=None) -> None:
    """The breakdown of a `packformer profile --breakdown` result: ms per forward by kernel category (rows)
    and peer (columns), their total, the wall time without the profiler, and each peer's GEMM time over
    the floor's when the floor was profiled."""
    bd = result.get("breakdown") or {}
    if not bd:
        return
    peers = list(bd)
    cats = [c for c in dict.fromkeys(c for b in bd.values() for c in b) if any(bd[p].get(c) for p in peers)]
    rows = [[c, *(bd[p].get(c, 0.0) for p in peers)] for c in cats]
    rows.append(["total kernels", *(round(sum(bd[p].values()), 4) for p in peers)])
    rows.append(["wall (no profiler)", *(result.get("wall_ms", {}).get(p) for p in peers)])
    if "x_floor_gemm" in result:
        rows.append(["× floor GEMMs", *(result["x_floor_gemm"][p] for p in peers)])
    w = result["workload"]
    basis = "device kernel time" if result["device"].startswith("cuda") else "self CPU time of aten ops"
    title = (f"{w['name']} ({w['num_seqs']} seqs, {w['real_tokens']} tokens): ms per forward by kernel category "
             f"({basis}{', CUDA graphs off' if result.get('eager') else ''}) - {result['model']} on "
             f"{device_label(result)}, {result['dtype']}")
    table(title, ["category", *peers], rows, file=file)


def bench_chart(result: dict, path: str | Path) -> Path:
    """One panel per workload: median ms per peer as horizontal bars (packformer green), each labelled with
    its time and packformer's speedup over it; the GEMM floors as red lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = result["workloads"]
    fig, axes = plt.subplots(len(wls), 1, figsize=(8, 1.2 + 0.42 * max(len(w["peers"]) for w in wls) * len(wls)),
                             squeeze=False)
    for ax, w in zip(axes[:, 0], wls):
        ok = [(n, p) for n, p in w["peers"].items() if p["status"] == "ok"]
        ms = [p["timing"]["median_ms"] for _, p in ok]
        colors = ["tab:green" if n.startswith("packformer") else "tab:gray" for n, _ in ok]
        ax.barh(range(len(ok)), ms, color=colors)
        ax.set_yticks(range(len(ok)), [n for n, _ in ok], fontsize=8)
        ax.invert_yaxis()
        for i, (n, p) in enumerate(ok):
            sp = p.get("speedup_of_packformer")
            label = f" {ms[i]:,.1f} ms" + (f"  ({sp:.2f}x)" if sp and n != "packformer" else "")
            ax.text(ms[i], i, label, va="center", fontsize=7)
        for kind, style in (("real", "--"), ("padded", ":")):
            f = (w.get("floor") or {}).get(kind)
            if f:
                ax.axvline(f["timing"]["median_ms"], color="tab:red", linestyle=style, linewidth=1,
                           label=f"GEMM floor, {kind} tokens")
        ax.set_xlim(0, max(ms, default=1) * 1.35)
        ax.set_xlabel("ms per batch (median); (Nx) = packformer's speedup over the peer", fontsize=8)
        ax.set_title(f"{w['name']}: {w['num_seqs']} seqs, {w['real_tokens']} tokens, "
                     f"{100 * w['pad_fraction']:.0f}% padding when padded", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['model']['source']} - {device_label(result)} - {result['dtype']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
