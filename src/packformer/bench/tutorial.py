"""PyTorch's Better Transformer tutorial, as one experiment, with packformer beside it.

Same model (XLM-R large + RobertaClassificationHead(num_classes=2)), same inputs (the small and the
big batch, padded with the pad id 1 as `to_tensor(..., padding_value=1)` does), same runs (slow path,
then Better Transformer's fast path with sparsity off and on), on the CPU and then on the chosen
device, each with torch profiler tables; then packformer on the same weights, padded input and packed.

One deliberate difference: the tutorial's first (slow-path) run leaves the model in its default train
mode, so dropout is active and its outputs are random. Here the slow path runs in eval mode with
autograd recording, which is still torch's slow path (the fast path needs autograd off) but is
deterministic, so every other run's output can be checked against it.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable

import torch

from ..batch import pack_padded_ids
from ..config import preset
from ..engine import Model
from ..heads import ClassificationHead
from ..loaders.parts import ModelParts
from ..runtime import resolve_device, resolve_dtype
from . import convert
from .compare import compare
from .profile import profile_calls
from .timing import measure
from .workloads import TUTORIAL_BIG_BATCH, TUTORIAL_SMALL_BATCH, pad_ids

FASTPATH_OP = "aten::_transformer_encoder_layer_fwd"
SLOW_PATH_NOTE = ("The tutorial's first run leaves the model in train mode (dropout active), so its outputs "
                  "change from call to call and nothing can be checked against them. Here the slow path runs in "
                  "eval mode with autograd recording - still torch's slow path, as the fast path needs autograd "
                  "off - so it is deterministic and every output below is compared with it.")


@dataclasses.dataclass(frozen=True)
class Run:
    key: str
    label: str


RUNS = [
    Run("slow_path", "slow path (eval, autograd recording)"),
    Run("bt_fast_dense", "BT fast path, sparsity off"),
    Run("bt_fast_sparse", "BT fast path, sparsity on"),
    Run("packformer_padded", "packformer model(padded ids)"),
    Run("packformer_packed", "packformer classify_batch(packed)"),
]
BATCHES = {"small": TUTORIAL_SMALL_BATCH, "big": TUTORIAL_BIG_BATCH}


def tutorial_parts(checkpoint: str | None = None, spm: str | None = None, shape: str = "xlmr-large",
                   seed: int = 0) -> tuple[ModelParts, list[str]]:
    """The tutorial's model and lines that say where its weights and tokenizer come from."""
    from ..loading import builtin_model_dir, load_parts, random_parts
    from ..tokenize import HFTokenizer, SentencePieceTokenizer

    notes = []
    if checkpoint:
        parts = load_parts(checkpoint, **({"spm": spm} if spm else {}))
        notes.append(f"weights: {checkpoint}")
        cfg = parts.config
    else:
        cfg = preset(shape)
        notes.append(f"weights: RANDOM, shape {shape} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_heads} heads) - no --checkpoint given; timings are the real shape's, outputs are "
                     "not predictions")
        parts = None
    tok = None
    if spm and not (parts is not None and parts.tokenizer is not None):
        tok = SentencePieceTokenizer(spm)
        notes.append(f"tokenizer: sentencepiece {spm}")
    elif parts is not None and parts.tokenizer is not None:
        tok = parts.tokenizer
        notes.append("tokenizer: the checkpoint's sentencepiece model")
    else:
        if cfg.vocab_size < 30522:
            raise ValueError(f"shape {shape} has a vocabulary of {cfg.vocab_size} ids; the built-in WordPiece "
                             "tokenizer needs 30522: pass --spm")
        tok = HFTokenizer.from_folder(builtin_model_dir(), pad_id=cfg.pad_token_id, position_offset=cfg.position_offset)
        notes.append("tokenizer: the built-in WordPiece (all-MiniLM-L6-v2's), as no --spm was given; the "
                     "tutorial's XLM-R sentencepiece gives other lengths")
    if parts is None:
        parts = random_parts(shape, num_labels=2, seed=seed, tokenizer=tok)
    elif parts.tokenizer is None:
        parts.tokenizer = tok
    if parts.head is None:   # the tutorial builds a fresh RobertaClassificationHead(num_classes=2) itself
        torch.manual_seed(seed)
        parts.head = ClassificationHead(parts.config.hidden_size, 2, act="relu")
        parts.config = parts.config.replace(num_labels=2)
        notes.append("head: a new RobertaClassificationHead(num_classes=2) (dense, ReLU, out_proj), as the "
                     "tutorial creates")
    parts.encoder.float().eval().requires_grad_(False)
    parts.head.float().eval().requires_grad_(False)
    return parts, notes


def run_tutorial(device: str = "cpu", iterations: int = 10, checkpoint: str | None = None, spm: str | None = None,
                 shape: str = "xlmr-large", dtype: str | None = "float32", warmup: int = 1,
                 profile_iterations: int = 1, top: int = 10, log: Callable[[str], None] | None = print) -> dict:
    """Run the experiment; print profiler tables and a summary; return a JSON-ready dict.

    The CPU always runs (fp32); a CUDA `device` runs after it in `dtype` (default fp32, as the tutorial).
    profile_iterations=0 skips the profiler tables."""
    from .report import machine_info

    log = log or (lambda s: None)
    dev = resolve_device(device)
    parts, notes = tutorial_parts(checkpoint, spm, shape)
    cfg = parts.config
    pad = cfg.pad_token_id
    batches = {}
    for name, texts in BATCHES.items():
        ids = parts.tokenizer.encode(texts, parts.max_seq_length)
        padded, _ = pad_ids(ids, pad)
        batches[name] = {"texts": texts, "lengths": [len(s) for s in ids], "padded": padded}
    notes.append(f"inputs padded with padding_value={pad}; lengths: small {batches['small']['lengths']}, "
                 f"big {batches['big']['lengths']}")
    notes.append(SLOW_PATH_NOTE)
    for line in notes:
        log(line)
    devices = [torch.device("cpu")] + ([dev] if dev.type != "cpu" else [])
    result: dict = {"schema": "packformer.tutorial/1", "machine": machine_info(dev),
                    "model": {"source": parts.source, "shape": shape if not checkpoint else None,
                              "layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
                              "weights": "random" if parts.format == "random" else "loaded"},
                    "notes": notes, "iterations": iterations, "warmup": warmup, "padding_value": pad,
                    "batches": {k: {"lengths": v["lengths"]} for k, v in batches.items()}, "results": []}
    for d in devices:
        dt = torch.float32 if d.type == "cpu" else resolve_dtype(dtype, d)
        result["results"] += _run_device(parts, batches, d, dt, iterations, warmup, profile_iterations, top, log)
    summary(result, log)
    return result


def _run_device(parts: ModelParts, batches: dict, dev: torch.device, dt: torch.dtype, iterations: int, warmup: int,
                profile_iterations: int, top: int, log) -> list[dict]:
    cfg = parts.config
    bt = convert.to_better_transformer(parts.encoder, parts.head).to(dev, dt)
    model = Model(dataclasses.replace(parts, encoder=copy.deepcopy(parts.encoder), head=copy.deepcopy(parts.head)),
                  device=dev, dtype=dt)
    out = []
    for bname, b in batches.items():
        padded = b["padded"].to(dev)                                               # [B, L]
        mask = b["padded"].ne(cfg.pad_token_id)                                    # [B, L] on CPU
        packed, _ = pack_padded_ids(b["padded"], cfg.pad_token_id, cfg.position_offset)

        bt_fn, bt_feats = (lambda: bt(padded)), (lambda: bt.features(padded)[mask.to(dev)])
        pf_feats = (lambda: model.hidden_states(packed))
        # run -> (timed call, features call, grad context, Better Transformer state (requires_grad, sparsity))
        calls = {
            "slow_path": (bt_fn, bt_feats, torch.enable_grad, (True, True)),
            "bt_fast_dense": (bt_fn, bt_feats, torch.no_grad, (False, False)),
            "bt_fast_sparse": (bt_fn, bt_feats, torch.no_grad, (False, True)),
            "packformer_padded": (lambda: model(padded), pf_feats, torch.no_grad, None),
            "packformer_packed": (lambda: model.classify_batch(packed), pf_feats, torch.no_grad, None),
        }
        ref_logits = ref_feats = None
        for run in RUNS:
            fn, feats_fn, ctx, state = calls[run.key]
            if state is not None:   # what torch reads at forward time to pick its path
                bt.requires_grad_(state[0])
                bt.set_sparsity(state[1])

            def timed(fn=fn, ctx=ctx):
                with ctx(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # torch's "nested tensors are a prototype" warning
                    return fn()
            t, logits = measure(timed, dev, iterations, warmup)
            with ctx(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                feats = feats_fn().detach().float().cpu()                           # [T, H]
            logits = logits.detach().float().cpu()                                  # [B, 2]
            if ref_logits is None:
                ref_logits, ref_feats = logits, feats
            entry = {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "batch": bname, "run": run.key,
                     "label": run.label, "timing": t.to_dict(), "ms_per_iter": round(t.median_ms, 4),
                     "logits": [[round(float(x), 6) for x in row] for row in logits],
                     "max_abs_diff_logits": float((logits - ref_logits).abs().max()),
                     "max_abs_diff_features": float((feats - ref_feats).abs().max()),
                     "agreement": compare(feats, ref_feats, dt, "token")}
            if profile_iterations:
                prof = profile_calls(timed, dev, profile_iterations, top)
                log(f"\n{run.label} - {bname} batch on {dev} ({entry['dtype']}), {profile_iterations} iteration(s):")
                log("=" * 60)
                log(prof.table)
                entry["profile"] = prof.to_dict()
                if run.key.startswith(("bt", "slow")):
                    entry["bt_fastpath_kernel_seen"] = FASTPATH_OP in prof.op_names
            log(f"{dev.type} {bname:<5} {run.label:<40} {t.median_ms:10.2f} ms/iter  "
                f"max|diff| logits {entry['max_abs_diff_logits']:.2e}")
            out.append(entry)
        slow = next(e for e in out if e["batch"] == bname and e["run"] == "slow_path" and e["device"] == str(dev))
        for e in out:
            if e["batch"] == bname and e["device"] == str(dev):
                e["speedup_vs_slow_path"] = round(slow["ms_per_iter"] / e["ms_per_iter"], 4)
    del bt, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def summary(result: dict, log) -> None:
    from .report import table

    import io
    buf = io.StringIO()
    rows = [[r["label"], r["device"], r["batch"], r["dtype"], r["ms_per_iter"], r["speedup_vs_slow_path"],
             r["max_abs_diff_logits"], r["max_abs_diff_features"], r["agreement"]["agrees"]] for r in result["results"]]
    table("Summary: ms per iteration (median), speedup over the slow path, largest difference from the slow "
          "path's (eval-mode) output", ["run", "device", "batch", "dtype", "ms/iter", "speedup", "max|diff| logits",
                                        "max|diff| features", "agrees"], rows, file=buf)
    log("\n" + buf.getvalue())


def tutorial_chart(result: dict, path) -> None:
    """Grouped bars: one group per (device, batch), one bar per run; ms per iteration, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    groups = []
    for r in result["results"]:
        g = (r["device"], r["batch"])
        if g not in groups:
            groups.append(g)
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(groups)), 4.8))
    width = 0.8 / len(RUNS)
    colors = ["tab:gray", "tab:blue", "tab:cyan", "tab:olive", "tab:green"]
    for j, run in enumerate(RUNS):
        xs, ys, sps = [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in result["results"] if (r["device"], r["batch"]) == g and r["run"] == run.key), None)
            if r:
                xs.append(i + (j - (len(RUNS) - 1) / 2) * width)
                ys.append(r["ms_per_iter"])
                sps.append(r["speedup_vs_slow_path"])
        ax.bar(xs, ys, width, label=run.label, color=colors[j % len(colors)])
        for x, y, sp in zip(xs, ys, sps):
            ax.text(x, y * 1.05, f"{sp:.1f}x", ha="center", va="bottom", fontsize=6)
    every = [r["ms_per_iter"] for r in result["results"]]
    ax.set_xticks(range(len(groups)), [f"{d} / {b} batch" for d, b in groups])
    ax.set_yscale("log")
    ax.set_ylim(min(every) / 4, max(every) * 2)   # bars start well below the smallest: heights stay comparable
    ax.set_ylabel("ms per iteration (median, log); labels: speedup over the slow path", fontsize=8)
    src = result["model"]["source"] + (" (random weights)" if result["model"]["weights"] == "random" else "")
    ax.set_title(f"Better Transformer tutorial + packformer - {src}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
