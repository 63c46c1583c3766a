"""Declarative checkpoint-key maps: checkpoint names -> packformer parameter names.

A rule maps one packformer parameter to one or more checkpoint keys (several keys are concatenated
along dim 0, as q/k/v become one fused qkv). `{i}` stands for the layer index. Loading checks both
directions and names every missing and every unused key, and every shape that does not fit.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists what was expected and what was found."""


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# name -> (checkpoint -> packformer, packformer -> checkpoint); both act on the concatenated tensor
TRANSFORMS = {
    # a fused [up; gate] projection becomes packformer's [gate; up] (its own inverse)
    "swap_halves": (_swap_halves, _swap_halves),
    # Gemma's RMSNorms scale by (1 + w): packformer's RMSNorm holds the folded weight 1 + w
    # (in fp32, as Gemma computes 1.0 + w.float(): 1 + w rounded to a bf16 checkpoint's 8 bits would not match)
    "plus_one": (lambda t: t.float() + 1.0, lambda t: t - 1.0),
}


@dataclass(frozen=True)
class Rule:
    target: str                      # packformer parameter, may contain {i}
    sources: tuple[str, ...]         # checkpoint keys, concatenated along dim 0 when several
    transform: str | None = None     # a TRANSFORMS entry applied after concatenation

    @classmethod
    def of(cls, target: str, *sources: str, transform: str | None = None) -> "Rule":
        if transform is not None and transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
        return cls(target, tuple(sources), transform)


def module_rules(modules: Mapping[str, str | tuple[str, ...]], leaves: tuple[str, ...] = ("weight", "bias")
                 ) -> list[Rule]:
    """One Rule per leaf of each module: {"layers.{i}.qkv": (q, k, v prefixes), "layers.{i}.out": prefix}
    -> layers.{i}.qkv.weight <- q.weight + k.weight + v.weight, ... (the common case of a key map)."""
    out = []
    for target, src in modules.items():
        srcs = (src,) if isinstance(src, str) else tuple(src)
        out += [Rule.of(f"{target}.{leaf}", *(f"{s}.{leaf}" for s in srcs)) for leaf in leaves]
    return out


@dataclass
class KeyMap:
    rules: list[Rule]
    ignore: list[str] = field(default_factory=list)   # glob patterns of checkpoint keys known to be unused
    optional: list[str] = field(default_factory=list)  # targets that may be absent (then the model keeps its init)
    absent: list[str] = field(default_factory=list)    # glob patterns of targets the family never has (loaded as zeros)

    def expand(self, num_layers: int) -> list[Rule]:
        out = []
        for r in self.rules:
            if "{i}" in r.target or any("{i}" in s for s in r.sources):
                out += [Rule(r.target.format(i=i), tuple(s.format(i=i) for s in r.sources), r.transform)
                        for i in range(num_layers)]
            else:
                out.append(r)
        return out

    def convert(self, state: Mapping[str, torch.Tensor], model: torch.nn.Module, num_layers: int,
                what: str = "checkpoint") -> dict[str, torch.Tensor]:
        """checkpoint state dict -> packformer state dict, checked against `model`'s parameters."""
        expected = dict(model.state_dict())
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        missing: list[str] = []
        bad_shapes: list[str] = []
        for rule in self.expand(num_layers):
            absent = [s for s in rule.sources if s not in state]
            if absent:
                if rule.target not in self.optional:
                    missing += absent
                continue
            tensors = [state[s] for s in rule.sources]
            used.update(rule.sources)
            value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            if rule.transform is not None:
                value = TRANSFORMS[rule.transform][0](value)
            if rule.target not in expected:
                missing.append(f"(no model parameter {rule.target})")
                continue
            want = tuple(expected[rule.target].shape)
            if tuple(value.shape) != want:
                got = " + ".join(str(tuple(t.shape)) for t in tensors)
                bad_shapes.append(f"{' + '.join(rule.sources)}: expected {want}, found {got}")
                continue
            out[rule.target] = value
        unused = sorted(k for k in state if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in self.ignore))
        unfilled = sorted(k for k in expected if k not in out and k not in self.optional
                          and not any(fnmatch.fnmatchcase(k, p) for p in self.absent))
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unused:
            problems.append(f"unused keys ({len(unused)}): {', '.join(unused)}")
        if bad_shapes:
            problems.append(f"shape mismatches ({len(bad_shapes)}): {'; '.join(bad_shapes)}")
        if not problems and unfilled:
            problems.append(f"parameters not filled ({len(unfilled)}): {', '.join(unfilled)}")
        if problems:
            raise CheckpointError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
        # targets the family never has are zeros, whatever the model was initialised with (a family may
        # lack one bias while keeping the others: GTE's FFN input projection)
        for k in expected:
            if k not in out and any(fnmatch.fnmatchcase(k, p) for p in self.absent):
                out[k] = torch.zeros(expected[k].shape, dtype=expected[k].dtype)   # the model may be on meta
        return out

    def invert(self, params: Mapping[str, torch.Tensor], num_layers: int,
               rows: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """packformer state dict -> checkpoint state dict (for round-trip tests and export). A fused target
        splits into equal parts, or by `rows` (checkpoint key -> its dim-0 size) where it names every
        source (grouped-query attention: q has more rows than k and v)."""
        out: dict[str, torch.Tensor] = {}
        for rule in self.expand(num_layers):
            if rule.target not in params:
                continue
            value = params[rule.target]
            if rule.transform is not None:
                value = TRANSFORMS[rule.transform][1](value)
            if rows is not None and len(rule.sources) > 1 and all(s in rows for s in rule.sources):
                parts = value.split([rows[s] for s in rule.sources], dim=0)
            else:
                parts = value.chunk(len(rule.sources), dim=0)
            out.update(zip(rule.sources, parts))
        return out


def strip_prefix(state: Mapping[str, torch.Tensor], anchor: str) -> tuple[dict[str, torch.Tensor], str]:
    """Find the prefix in front of `anchor` (e.g. 'bert.' before 'embeddings.word_embeddings.weight')
    and drop it from every key that has it. Returns the new dict and the prefix."""
    prefix = ""
    for k in state:
        if k.endswith(anchor):
            prefix = k[: -len(anchor)]
            break
    if not prefix:
        return dict(state), ""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}, prefix


def rename_legacy_layernorm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints call LayerNorm parameters gamma/beta."""
    def fix(k: str) -> str:
        if k.endswith("LayerNorm.gamma"):
            return k[: -len("gamma")] + "weight"
        if k.endswith("LayerNorm.beta"):
            return k[: -len("beta")] + "bias"
        return k
    return {fix(k): v for k, v in state.items()}


def first_present(state: Mapping[str, torch.Tensor], candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if c in state), None)
