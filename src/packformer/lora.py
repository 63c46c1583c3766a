"""Per-task LoRA adapters (Jina v3): several tasks share one encoder and differ by a low-rank delta on every
adapted weight, W_task = W + (alpha / rank) * B_task A_task.

How packformer runs them: a task's deltas are merged into a copy of the adapted weights once, on the task's
first use, and that merged encoder gets its own runner (model.py reference, CPU or CUDA fast path) exactly as
a model without adapters does. A forward therefore never mixes tasks: the engine picks the runner per call
and the server batches requests per task. Merging costs one model's worth of adapted weights per task used
(every Linear and the embedding tables) and nothing per token; applying the factors per row group inside
the backends (x W^T + s (x A^T) B^T, one task per group of rows) would save that memory and let one batch
mix tasks, at the price of extra GEMMs in every backend: not done here.

Without a task the encoder runs its base weights, as Jina's own code does when no task is given.

`LoraAdapters` (EncoderConfig.adapters) states the tasks, rank, alpha and each task's instruction (the text
Jina's `encode(task=...)` prepends to every input). `LoraWeights` holds the factors in the checkpoint's
own shapes, so the key map loads them one to one: a Linear [out, in] has A [tasks, rank, in] and
B [tasks, out, rank] (delta B A); an embedding table [rows, dim] has A [tasks, rows, rank] and
B [tasks, rank, dim] (delta A B).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LINEAR_TARGETS = ("qkv", "out", "ffn1", "ffn2")


@dataclass(frozen=True)
class LoraAdapters:
    """The adapters of a model: task names in checkpoint order (the index into the factors' first dim)."""

    tasks: tuple[str, ...]
    rank: int = 4
    alpha: float = 1.0
    instructions: tuple[tuple[str, str], ...] = ()   # (task, text prepended to its inputs); absent = none

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"LoRA adapters need a non-empty list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"LoRA task names must be unique, got {list(tasks)}")
        object.__setattr__(self, "tasks", tuple(tasks))
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        ins = self.instructions
        pairs = tuple((str(k), str(v)) for k, v in (ins.items() if isinstance(ins, dict) else ins))
        unknown = [k for k, _ in pairs if k not in tasks]
        if unknown:
            raise ValueError(f"instructions for tasks {unknown} that are not among the adapters {list(tasks)}")
        object.__setattr__(self, "instructions", pairs)
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def instruction(self, task: str | None) -> str:
        return dict(self.instructions).get(task, "") if task is not None else ""


class LoraPair(nn.Module):
    """One adapted weight's factors for every task (see the module docstring for the shapes)."""

    def __init__(self, tasks: int, rows: int, cols: int, rank: int, embedding: bool):
        super().__init__()
        self.embedding = embedding
        a, b = ((tasks, rows, rank), (tasks, rank, cols)) if embedding else ((tasks, rank, cols), (tasks, rows, rank))
        self.A = nn.Parameter(torch.zeros(a))
        self.B = nn.Parameter(torch.zeros(b))

    def delta(self, k: int) -> torch.Tensor:
        """Task k's unscaled delta [rows, cols], fp32."""
        a, b = self.A[k].float(), self.B[k].float()
        return a @ b if self.embedding else b @ a


class _LayerLora(nn.Module):
    def __init__(self, layer: nn.Module, tasks: int, rank: int):
        super().__init__()
        for name in LINEAR_TARGETS:
            out_f, in_f = getattr(layer, name).weight.shape
            setattr(self, name, LoraPair(tasks, out_f, in_f, rank, embedding=False))


class LoraWeights(nn.Module):
    """The factors of every adapted weight of an Encoder: the word and token-type tables and every Linear
    of every layer (qkv, out, ffn1, ffn2). Its parameter names mirror the targets: `word.A`,
    `layers.3.qkv.B`, ..."""

    def __init__(self, adapters: LoraAdapters, encoder: nn.Module):
        super().__init__()
        n, r = len(adapters.tasks), adapters.rank
        emb = encoder.embeddings
        self.word = LoraPair(n, *emb.word.weight.shape, r, embedding=True)
        self.token_type = (LoraPair(n, *emb.token_type.weight.shape, r, embedding=True)
                           if emb.token_type is not None else None)
        self.layers = nn.ModuleList(_LayerLora(layer, n, r) for layer in encoder.layers)

    def targets(self) -> list[tuple[str, LoraPair]]:
        """(Encoder parameter name, its factors) for every adapted weight."""
        out = [("embeddings.word.weight", self.word)]
        if self.token_type is not None:
            out.append(("embeddings.token_type.weight", self.token_type))
        for i, layer in enumerate(self.layers):
            out += [(f"layers.{i}.{name}.weight", getattr(layer, name)) for name in LINEAR_TARGETS]
        return out


def merged_encoder(encoder: nn.Module, task: str) -> nn.Module:
    """A copy of `encoder` (an Encoder with adapters) running `task`: every adapted weight becomes
    W + (B A) * alpha / rank, summed in fp32 as Jina's LoRA parametrization does, then cast to the weight's
    dtype. Weights no adapter touches (norms, biases) are shared with `encoder`, not copied. The copy has
    no adapters of its own (config.adapters None), so every runner treats it as a plain encoder."""
    from .model import Encoder

    cfg = encoder.config
    if cfg.adapters is None or encoder.lora is None:
        raise ValueError("this encoder has no LoRA adapters")
    k, scale = cfg.adapters.index(task), cfg.adapters.scaling
    with torch.device("meta"):
        out = Encoder(cfg.replace(adapters=None))
    state: dict[str, Any] = {n: t for n, t in encoder.state_dict().items() if not n.startswith("lora.")}
    with torch.no_grad():
        for name, pair in encoder.lora.targets():
            w = state[name]
            state[name] = (w.float() + pair.delta(k) * scale).to(w.dtype)
    out.load_state_dict(state, assign=True)
    return out.eval().requires_grad_(False)


__all__ = ["LoraAdapters", "LoraWeights", "LoraPair", "merged_encoder", "LINEAR_TARGETS"]
