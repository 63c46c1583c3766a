"""The encoder families packformer loads, by config.json `model_type`.

Each module here defines one `Family` (base.py) named FAMILY: its config mapping, key map, presets and
head. Adding a family is adding a module; it is found here by name."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Family

_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")
_MODULES.insert(0, _MODULES.pop(_MODULES.index("bert")))      # the reference family first in listings
FAMILIES: dict[str, Family] = {}          # family name -> Family
BY_MODEL_TYPE: dict[str, Family] = {}     # config.json model_type -> Family

for _name in _MODULES:
    _fam: Family = importlib.import_module(f"{__name__}.{_name}").FAMILY
    FAMILIES[_fam.name] = _fam
    for _mt in _fam.model_types:
        BY_MODEL_TYPE[_mt] = _fam


def _register_presets() -> None:
    from ..config import PRESETS
    for fam in FAMILIES.values():
        PRESETS.update(fam.presets)


_register_presets()


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def known_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def family_of(model_type: str | dict) -> Family:
    """The family that loads `model_type` (or a whole config.json dict, which lets a family claim
    configs by more than their model_type); a ValueError listing the known ones otherwise."""
    if isinstance(model_type, dict):
        d = model_type
        for fam in FAMILIES.values():
            if fam.claims is not None and fam.claims(d):
                return fam
        model_type = d.get("model_type", "")
    fam = BY_MODEL_TYPE.get(model_type)
    if fam is None:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; packformer loads "
                         + ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values()))
    return fam


def all_presets() -> dict:
    out = {}
    for fam in FAMILIES.values():
        out.update(fam.presets)
    return out


__all__ = ["Family", "FAMILIES", "BY_MODEL_TYPE", "family_of", "family_named", "known_model_types", "all_presets"]


def model_dtype(cfg, device, dtype=None):
    """The dtype a model of `cfg` runs in on `device`: `dtype` if given (checked), else fp32 on CPU and its
    family's `gpu_dtype` on CUDA (fp16, or bf16 for the decoder families). Decides without moving weights."""
    from ..runtime import resolve_dtype

    fam = FAMILIES.get(cfg.family)
    return resolve_dtype(dtype, device, fam.gpu_dtype if fam is not None else "float16")
