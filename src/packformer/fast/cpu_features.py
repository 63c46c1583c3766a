"""What this CPU can do natively, as the kernels that run here see it.

bf16 is fast only where the CPU has AMX tiles (amx_bf16: ~7x an fp32 GEMM) or at least the AVX-512
bf16 dot product (avx512_bf16: ~1x-2x, measured below fp32 on a KVM guest without AMX). int8 GEMMs use
VNNI (avx512_vnni / avx_vnni) or AMX int8. Detection asks torch first (it reads CPUID) and falls back
to the flags of /proc/cpuinfo.

The instruction sets the kernels may use can be capped below what CPUID reports: `ONEDNN_MAX_CPU_ISA`
caps oneDNN (every GEMM of the CPU path) and `ATEN_CPU_CAPABILITY` caps torch's own vectorized ops.
CI runs the CPU tests a second time under `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, so that
green on an AVX-512 machine also means green on an AVX2-only one; `detect()` follows those caps, so
what it reports (and what is recorded with benchmark results) is what the kernels really run.
Decisions that correctness depends on (the int8 weight range) are made by probing the kernel itself
(`quant.int8_weight_qmax`), not from these flags.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

_FLAGS = ("avx512_f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# /proc/cpuinfo spells some flags differently from torch's capability keys
_CPUINFO_NAMES = {"avx512_f": "avx512f"}

# oneDNN's ISA levels as ONEDNN_MAX_CPU_ISA names them, lowest first (aliases share a rank)
_ONEDNN_RANK = {"SSE41": 0, "AVX": 1, "AVX2": 2, "AVX2_VNNI": 3, "AVX2_VNNI_2": 4, "AVX512_CORE": 5,
                "AVX512_CORE_VNNI": 6, "AVX512_CORE_BF16": 7, "AVX10_1_512": 8, "AVX512_CORE_FP16": 8,
                "AVX10_1_512_AMX": 9, "AVX512_CORE_AMX": 9, "AVX10_1_512_AMX_FP16": 10,
                "AVX512_CORE_AMX_FP16": 10, "AVX10_2_512": 11, "AVX10_2_512_AMX_2": 12, "DEFAULT": 99}
# the lowest oneDNN level whose kernels use each feature (avx_vnni: its own branch, in apply_caps)
_NEEDS_ONEDNN = {"avx512_f": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI", "avx512_bf16": "AVX512_CORE_BF16",
                 "amx_tile": "AVX10_1_512_AMX", "amx_bf16": "AVX10_1_512_AMX", "amx_int8": "AVX10_1_512_AMX"}


@dataclass(frozen=True)
class CpuFeatures:
    avx512_f: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    physical_cores: int = 1
    source: str = "none"               # "torch" or "/proc/cpuinfo"
    cap: str = ""                      # the ISA caps in force, e.g. "ONEDNN_MAX_CPU_ISA=AVX2"; "" for none

    @property
    def bf16_native(self) -> bool:
        """bf16 GEMMs run in hardware (AMX or AVX-512 bf16), not by up-converting to fp32."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def bf16_fast(self) -> bool:
        """bf16 GEMMs are expected to beat fp32 clearly: only AMX tiles give that."""
        return self.amx_bf16

    @property
    def int8_native(self) -> bool:
        """int8 dot products in hardware (VNNI or AMX int8)."""
        return self.amx_int8 or self.avx512_vnni or self.avx_vnni

    @property
    def isa(self) -> str:
        """The widest GEMM instruction set the kernels may use: "amx", "avx512_vnni", "avx512", "avx2_vnni"
        or "avx2" (this project runs on x86-64 CPUs with at least AVX2)."""
        if self.amx_tile:
            return "amx"
        if self.avx512_f:
            return "avx512_vnni" if self.avx512_vnni else "avx512"
        return "avx2_vnni" if self.avx_vnni else "avx2"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bf16_native=self.bf16_native, bf16_fast=self.bf16_fast, int8_native=self.int8_native,
                 isa=self.isa)
        return d


def apply_caps(features: dict[str, bool], env: dict[str, str] | os._Environ = os.environ) -> tuple[dict[str, bool], str]:
    """The flags the kernels may use under `ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY`, and the caps
    that applied ("" when none did). An unknown cap value is ignored, as oneDNN and torch ignore it."""
    out, caps = dict(features), []
    onednn = env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if onednn in _ONEDNN_RANK and onednn != "DEFAULT":
        caps.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
        rank = _ONEDNN_RANK[onednn]
        for flag, needs in _NEEDS_ONEDNN.items():
            out[flag] = out.get(flag, False) and rank >= _ONEDNN_RANK[needs]
        # the AVX2 VNNI kernels sit beside, not below, plain AVX-512: allowed on their own branch or from
        # AVX-512 VNNI up
        avx2_vnni = onednn in ("AVX2_VNNI", "AVX2_VNNI_2") or rank >= _ONEDNN_RANK["AVX512_CORE_VNNI"]
        out["avx_vnni"] = out.get("avx_vnni", False) and avx2_vnni
    aten = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "avx2"):       # torch's vectorized ops without AVX-512
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
        out["avx512_f"] = False
    return out, " ".join(caps)


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _from_torch() -> tuple[dict[str, bool], int] | None:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return None
    try:
        caps = get()
    except Exception:  # pragma: no cover - depends on the torch build
        return None
    cores = int(caps.get("num_physical_cores") or 0) or _affinity_count()
    return {f: bool(caps.get(f, False)) for f in _FLAGS}, cores


def _parse_cpuinfo(text: str) -> tuple[dict[str, bool], int]:
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    processors = 0
    phys = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return {f: _CPUINFO_NAMES.get(f, f) in flags for f in _FLAGS}, len(cores) or processors or 1


def _features(flags: dict[str, bool], cores: int, source: str,
              env: dict[str, str] | os._Environ = os.environ) -> CpuFeatures:
    capped, cap = apply_caps(flags, env)
    return CpuFeatures(**capped, physical_cores=max(1, min(cores, _affinity_count())), source=source, cap=cap)


def parse_cpuinfo(text: str, env: dict[str, str] | os._Environ = os.environ) -> CpuFeatures:
    """Features from the text of /proc/cpuinfo (the flags of the first processor; cores counted from
    distinct (physical id, core id) pairs, else the processor count), under the caps of `env`."""
    return _features(*_parse_cpuinfo(text), source="/proc/cpuinfo", env=env)


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    """The features of the CPU this process runs on, under the ISA caps of its environment (cached:
    neither changes while it runs: oneDNN and torch read the caps once)."""
    found = _from_torch()
    if found is not None:
        return _features(*found, source="torch")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return parse_cpuinfo(f.read())
    except OSError:  # pragma: no cover - not Linux
        return CpuFeatures(physical_cores=_affinity_count())


def describe_cpu() -> dict:
    """The CPU model, its ISA as the kernels see it, and the caps in force: for recorded results."""
    fields = {"model name": "", "cpu family": "", "model": ""}   # a VM may show only "AMD EPYC": family tells Zen 3/4/5
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in fields and not fields[key.strip()]:
                    fields[key.strip()] = value.strip()
                if not line.strip():
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    f = detect()
    return {"cpu": fields["model name"], "cpu_family": fields["cpu family"], "cpu_model": fields["model"], "isa": f.isa, "isa_cap": f.cap, "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "int8_native": f.int8_native, "bf16_native": f.bf16_native, "amx": f.amx_tile}
