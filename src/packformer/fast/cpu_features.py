"""What this CPU can do natively: decides whether bf16 and int8 modes are worth opting into.

bf16 is fast only where the CPU has AMX tiles (amx_bf16: ~7x an fp32 GEMM) or at least the AVX-512
bf16 dot product (avx512_bf16: ~1x-2x, measured below fp32 on a KVM guest without AMX). int8 GEMMs use
VNNI (avx512_vnni / avx_vnni) or AMX int8. Detection asks torch first (it reads CPUID, so it sees what
the kernels will use) and falls back to the flags of /proc/cpuinfo.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

_FLAGS = ("avx512_f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# /proc/cpuinfo spells some flags differently from torch's capability keys
_CPUINFO_NAMES = {"avx512_f": "avx512f"}


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bf16_native=self.bf16_native, bf16_fast=self.bf16_fast, int8_native=self.int8_native)
        return d


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _from_torch() -> CpuFeatures | None:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return None
    try:
        caps = get()
    except Exception:  # pragma: no cover - depends on the torch build
        return None
    cores = int(caps.get("num_physical_cores") or 0) or _affinity_count()
    return CpuFeatures(**{f: bool(caps.get(f, False)) for f in _FLAGS},
                       physical_cores=max(1, min(cores, _affinity_count())), source="torch")


def parse_cpuinfo(text: str) -> CpuFeatures:
    """Features from the text of /proc/cpuinfo (the flags of the first processor; cores counted from
    distinct (physical id, core id) pairs, else the processor count)."""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    processors = 0
    phys = core = ""
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
            core = value
            cores.add((phys, core))
    n = len(cores) or processors or 1
    return CpuFeatures(**{f: _CPUINFO_NAMES.get(f, f) in flags for f in _FLAGS},
                       physical_cores=max(1, min(n, _affinity_count())), source="/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    """The features of the CPU this process runs on (cached: they do not change while it runs)."""
    found = _from_torch()
    if found is not None:
        return found
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return parse_cpuinfo(f.read())
    except OSError:  # pragma: no cover - not Linux
        return CpuFeatures(physical_cores=_affinity_count())
