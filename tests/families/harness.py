"""Shared checks for every family: a random-weight transformers model saved with `save_pretrained`,
loaded by packformer, must give the same hidden states (and logits) on a packed batch as transformers
gives on the padded one, on every path packformer runs on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import packformer


def perturb_norms(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Untrained norms are the identity: perturb them (and zero-initialised biases) so that a swapped or
    dropped weight shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def ragged_ids(lengths: Sequence[int], vocab: tuple[int, int], pad_id: int, seed: int = 1):
    """([B, L] ids padded with pad_id, [B, L] attention mask, list of per-sequence id lists)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    seqs = []
    for i, n in enumerate(lengths):
        s = torch.randint(vocab[0], vocab[1], (n,), generator=g)
        ids[i, :n], mask[i, :n] = s, 1
        seqs.append(s.tolist())
    return ids, mask, seqs


def packed_reference(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[B, L, H] padded -> [T, H] rows of the real tokens, in order."""
    return torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])


def run_packed(model: "packformer.Model", seqs: list[list[int]]) -> torch.Tensor:
    """Hidden states [T, H] (fp32, CPU) of packformer on the sequences packed as given."""
    batch = model.pack_ids(seqs)
    with torch.inference_mode():
        return model.hidden_states(batch).float().cpu()


def check_hidden_states(folder: Path, ref: torch.Tensor, seqs, *, atol: float = 1e-4,
                        paths=("reference", "fast")) -> dict[str, float]:
    """Load `folder` on CPU in fp32 on each path and compare [T, H] against `ref`; returns the errors."""
    errs = {}
    for path in paths:
        m = packformer.load(folder, device="cpu", fast=path == "fast")
        got = run_packed(m, seqs)
        assert got.shape == ref.shape, f"{path}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        err = (got - ref).abs().max().item()
        errs[path] = err
        assert err <= atol * max(1.0, ref.abs().max().item()), f"{path}: max error {err:.3g} over {atol}"
    return errs


def check_alone_equals_batched(folder: Path, seqs, **load_kw) -> None:
    """A sequence's result never depends on what else shares its batch (bit for bit on CPU)."""
    m = packformer.load(folder, device="cpu", **load_kw)
    together = run_packed(m, seqs)
    start = 0
    for s in seqs:
        alone = run_packed(m, [s])
        assert torch.equal(alone, together[start:start + len(s)]), f"length {len(s)} differs alone vs batched"
        start += len(s)


# ---- families whose reference is a transcription of remote code (tests/families/ref_*.py) ------------
# Such a module provides config_json(**fields) -> dict, build(cfg) -> padded model, save(model, cfg, folder)
# -> folder (config.json + model.safetensors as the real checkpoint names them) and padded_forward(model,
# ids, mask) -> [B, L, H].

def reference_folders(ref, base: dict, variants: dict[str, dict], tmp_path_factory) -> dict:
    """variant -> (saved folder, padded reference model, its config.json dict)."""
    out = {}
    for name, changes in variants.items():
        cfg = ref.config_json(**{**base, **changes})
        model = ref.build(cfg)
        out[name] = (ref.save(model, cfg, tmp_path_factory.mktemp(name)), model, cfg)
    return out


def reference_hidden(ref, model, lengths: Sequence[int], vocab: tuple[int, int], seed: int = 1):
    """(the reference's packed hidden states [T, H], the id lists) for random sequences of `lengths`."""
    ids, mask, seqs = ragged_ids(lengths, vocab, pad_id=0, seed=seed)
    return packed_reference(ref.padded_forward(model, ids, mask), lengths), seqs
