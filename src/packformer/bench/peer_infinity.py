"""Infinity (infinity-emb) as a peer: its AsyncEmbeddingEngine in this process for `packformer bench`
(engine "torch": sentence-transformers; engine "optimum": ONNX Runtime), and the command line of its
server (`infinity_emb v2`) for `packformer bench-serve`.

What it takes, on infinity-emb 0.0.78, for Infinity to compute what packformer computes:
- the model's pooling, passed: `pooling_method="auto"` pools all-MiniLM-L6-v2's CLS token in the ONNX
  engine (cosine 0.24-0.51 to its embeddings). The torch engine pools by the folder's modules.json.
- ONNX: the engine keeps the file whose *name* equals the path it listed, so only model_name_or_path="."
  run from inside the folder finds model.onnx; it truncates at config.json's max_position_embeddings,
  which the folder sets to max_seq_length; its optimized-model cache is keyed by that path ("." for
  every model), so it is pointed at the run's scratch folder.
- with optimum 2 (what it resolves to today) its ONNX optimizer fails and BetterTransformer is gone:
  it logs both and runs the plain graph / plain transformers, as its users get it.
- it always L2-normalizes; importing it resets the root logger (put back here); no telemetry, no
  warm-up of its own (the bench warms every peer up).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .peer_folders import NoFolder, shared_folder
from .peers import INFINITY_INSTALL, Engine, NotApplicable, PeerContext, TextInputs

QUIET_ENV = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
SERVED_NAME = "packformer-bench"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def pooling_method(mode: str) -> str:
    """The model's pooling as Infinity names it (never "auto", which guesses)."""
    if mode not in ("mean", "cls"):
        raise NotApplicable(f"Infinity pools by mean or cls only; this model pools by {mode}")
    return mode


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def import_infinity():
    """infinity_emb's AsyncEmbeddingEngine and EngineArgs, imported without telemetry and without keeping
    its changes to the root logger; its own logger says warnings only."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from infinity_emb import AsyncEmbeddingEngine, EngineArgs
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logging.getLogger("infinity_emb").setLevel(logging.WARNING)
    return AsyncEmbeddingEngine, EngineArgs


def _onnx_file(engine) -> str:
    """The ONNX file Infinity runs (its optimizer writes *_optimized.onnx), for the notes."""
    try:
        return Path(engine._model_replicas[0].model.path).name
    except (AttributeError, IndexError, TypeError):
        return "?"


def _better_transformer() -> str:
    from infinity_emb.transformer import acceleration

    return "on" if "BetterTransformerManager" in vars(acceleration) else "unavailable (optimum >= 2)"


class InfinityEngine(Engine):
    """One AsyncEmbeddingEngine on an event loop of its own; each timed call embeds all texts in one
    `embed()` (Infinity queues them, sorts by length and batches up to batch_size)."""

    unit_norm = True

    def __init__(self, engine, name: str, dtype: torch.dtype, notes: str):
        self.engine, self.name, self.dtype, self.notes = engine, name, dtype, notes
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(engine.astart())

    def prepare(self, inputs):
        if not isinstance(inputs, TextInputs):
            raise NotApplicable(f"{self.name} embeds texts: use a text workload (texts_1500, texts_20000) or --texts")
        texts = inputs.texts
        return lambda: self.loop.run_until_complete(self.engine.embed(sentences=texts))[0]

    def result(self, raw, inputs):
        return torch.from_numpy(np.stack(raw)).float()

    def close(self):
        if self.loop is not None:
            self.loop.run_until_complete(self.engine.astop())
            self.loop.close()
        self.engine = self.loop = None


def _folder(ctx: PeerContext, onnx: bool) -> Path:
    parts = ctx.parts
    if not onnx and parts.format == "sentence-transformers":
        return Path(parts.source)                    # what a user would point Infinity at
    try:
        return shared_folder(parts, ctx.workdir, onnx=onnx)
    except NoFolder as e:
        raise NotApplicable(f"Infinity {e}") from None


def build_infinity(ctx: PeerContext, engine: str) -> Engine:
    """engine: "torch" (sentence-transformers inside) or "optimum" (ONNX Runtime, CPU)."""
    AsyncEmbeddingEngine, EngineArgs = import_infinity()
    onnx = engine == "optimum"
    pool = pooling_method(ctx.parts.pooler.mode)
    dtype = torch.float32 if onnx else ctx.dtype
    if dtype not in _DTYPES:
        raise NotApplicable(f"Infinity has no {dtype} mode")
    folder = _folder(ctx, onnx)
    args = dict(engine=engine, device=ctx.device.type, batch_size=ctx.batch_size, pooling_method=pool,
                model_warmup=False, compile=False, dtype=_DTYPES[dtype])
    if onnx:
        import infinity_emb.transformer.utils_optimum as uo

        cache, uo.HUGGINGFACE_HUB_CACHE = uo.HUGGINGFACE_HUB_CACHE, str(ctx.workdir / "infinity_cache")
        try:
            with _cwd(folder):      # the one path its ONNX lookup accepts (see above); the files load here
                eng = AsyncEmbeddingEngine.from_args(EngineArgs(model_name_or_path=".", **args))
        finally:
            uo.HUGGINGFACE_HUB_CACHE = cache
        notes = f"infinity_emb engine=optimum (ONNX Runtime, runs {_onnx_file(eng)}), pooling={pool}"
    else:
        eng = AsyncEmbeddingEngine.from_args(EngineArgs(model_name_or_path=str(folder), **args))
        notes = (f"infinity_emb engine=torch (sentence-transformers), pooling from the folder ({pool}), "
                 f"BetterTransformer {_better_transformer()}")
    notes += f", batch_size={ctx.batch_size}, one embed() of all texts"
    return InfinityEngine(eng, "infinity_onnx" if onnx else "infinity_torch", dtype, notes)


def server_command(model_dir: str | Path, device: str, pooling: str, batch_size: int = 32,
                   dtype: str | None = None) -> list[str]:
    """`infinity_emb v2` on a local model folder (torch engine), as its users start it; bench/launch.py's
    ServerProcess adds --host and --port. Run it with QUIET_ENV in its environment."""
    exe = Path(sys.executable).with_name("infinity_emb")
    exe = str(exe) if exe.exists() else shutil.which("infinity_emb")
    if exe is not None:
        launcher = [exe]
    elif importlib.util.find_spec("infinity_emb") is not None:
        # installed without its console script (pip --target, as on a host with no internet): the script
        # only calls this function
        launcher = [sys.executable, "-c", "import sys; from infinity_emb.cli import cli; sys.exit(cli())"]
    else:
        raise FileNotFoundError(f"infinity_emb is not installed: {INFINITY_INSTALL}")
    cmd = [*launcher, "v2", "--model-id", str(model_dir), "--served-model-name", SERVED_NAME, "--engine", "torch",
           "--device", device, "--pooling-method", pooling_method(pooling), "--batch-size", str(batch_size),
           "--no-compile", "--log-level", "warning"]
    if dtype:
        cmd += ["--dtype", dtype]
    return cmd
