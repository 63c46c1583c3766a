"""The model worker: one thread that owns the model, fed by the scheduler.

Why a thread: torch releases the GIL inside its kernels, so the event loop keeps accepting and
tokenizing requests while a batch runs, and everything that queued meanwhile becomes the next batch.
The worker warms the model before it reports ready. A failing batch fails only its own requests; the
worker then probes the model with a tiny batch and, if that fails too, declares itself dead (every
waiting request fails, /health turns 503) rather than serving from a broken device.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..batch import pack
from ..multivector import token_embeddings_batch
from ..sparse import sparse_batch, sparse_kind
from ..scheduler import Batch, Scheduler

if TYPE_CHECKING:
    import numpy as np

    from ..engine import Model
    from .metrics import Metrics

log = logging.getLogger("packformer.server")

EMBED, CLASSIFY, SCORE = "embed", "classify", "score"


class WorkerDied(RuntimeError):
    """The model no longer answers; the server must be restarted."""


class BatchFailed(RuntimeError):
    """The batch holding a request raised; other batches are unaffected."""


def embed_key(normalize: bool | None, task: str | None = None, skip: int = 0) -> tuple:
    """The scheduler key of embedding requests: batches form per key, so a batch never mixes tasks
    (each task runs its own merged weights, engine.Model.runner_for), nor prompt lengths left out of
    pooling (`skip`, include_prompt=False)."""
    if skip:
        return (EMBED, normalize, task, skip)
    return (EMBED, normalize) if task is None else (EMBED, normalize, task)


CLASSIFY_KEY = (CLASSIFY, None)
# cross-encoders: each entry is one tokenized (query, document) pair (rerank.PairSeq), scored on its own
SCORE_KEY = (SCORE, None)
# outputs of varying shape per sequence: sparse vectors (ids, weights) and token embeddings [L, H]
SPARSE_KEY, TOKENS_KEY = ("sparse", None), ("tokens", None)
ROW_OUTPUTS = {"sparse": sparse_batch, "tokens": token_embeddings_batch}


def serving_shapes(max_batch_tokens: int) -> list[tuple[int, int]]:
    """(tokens, sequences) shapes typical of served batches, from one short request up to the budget:
    what a runner that specializes on shapes (CUDA graphs) should prepare before the server is ready."""
    shapes = []
    t = 64
    while t <= max_batch_tokens:
        shapes += [(t, b) for b in (1, 8, 32, 128) if 2 * b <= t]
        t *= 4
    return shapes


class Worker:
    def __init__(self, model: "Model", scheduler: Scheduler, metrics: "Metrics | None" = None,
                 warmup_tokens: int | None = None, warm_tasks: list[str] | None = None):
        """`warmup_tokens`: size of the largest warm-up batch (default: the scheduler's token budget, so a
        full batch is known to fit in memory before the server reports ready). `warm_tasks`: tasks whose
        adapters are merged and warmed too (models with task adapters)."""
        self.model = model
        self.warm_tasks = list(warm_tasks or [])
        self.scheduler = scheduler
        self.metrics = metrics
        self.warmup_tokens = warmup_tokens if warmup_tokens is not None else scheduler.max_batch_tokens
        # [CLS] [SEP]: the smallest real input (a tokenizer without special tokens gets one real token)
        self.probe_ids: list[int] = model.token_ids([""])[0] or model.token_ids(["a"])[0]
        self.error: str | None = None
        self.last_success = 0.0                                  # monotonic time of the last good batch
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._main, name="packformer-worker", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting work; with drain, finish what is queued (up to `timeout` s), then end the thread.
        Requests still queued after that fail with WorkerDied."""
        stopping = WorkerDied("the server is shutting down")
        if drain:
            self.scheduler.close(stopping)
        else:
            self.scheduler.fail_all(stopping)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("worker did not drain within %.0f s; failing the requests still queued", timeout)
                self.scheduler.fail_all(stopping)
                self._thread.join(min(timeout, 5.0))
        self._ready.clear()
        self._set_ready_metric()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def state(self) -> str:
        if self.error is not None:
            return "dead"
        if self._thread is None:
            return "not started"
        if not self._thread.is_alive():
            return "stopped"
        return "ready" if self._ready.is_set() else "starting"

    # ---- the thread ---------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            t0 = time.perf_counter()
            self._warm_up()
            log.info("model warm in %.1f s", time.perf_counter() - t0)
        except Exception as e:
            self._die(f"warm-up failed: {type(e).__name__}: {e}")
            return
        self.last_success = time.monotonic()
        self._ready.set()
        self._set_ready_metric()
        try:
            while (batch := self.scheduler.next_batch()) is not None:
                self._run_and_report(batch)
                if self.error is not None:
                    return
        except BaseException as e:          # a bug in the loop itself: never leave waiters hanging
            self._die(f"worker loop crashed: {type(e).__name__}: {e}")

    def _warm_up(self) -> None:
        m = self.model
        shapes = serving_shapes(self.scheduler.max_batch_tokens)
        # the default runner, and those of the tasks to warm (their adapters merged now, not on their first
        # request), with their shape-specialized parts ready (e.g. CUDA graphs per token bucket)
        for runner in [m.runner] + [m.runner_for(task) for task in self.warm_tasks]:
            if callable(getattr(runner, "warmup", None)):
                runner.warmup(shapes)
        n = m.max_seq_length
        long_seq = self.probe_ids[:1] + [self.probe_ids[-1]] * (n - 1)
        batches = [[self.probe_ids], [long_seq] * max(1, self.warmup_tokens // n)]
        keys = [embed_key(None)] + ([CLASSIFY_KEY] if m.head is not None else [])
        keys += [embed_key(None, task) for task in self.warm_tasks]
        for key in keys:
            for seqs in batches:
                self.run(key, seqs)
        if hasattr(m, "score_seqs"):                          # a cross-encoder: its pairs carry token types
            if callable(getattr(m.runner, "warmup", None)) and m.uses_token_types:
                m.runner.warmup(shapes, has_token_types=True)
            pair = m.pair_ids([("a", "b")])[0]
            long_pair = m.pair_ids([("a", "a " * n)])[0]            # cut to the model's maximum
            for seqs in ([pair], [long_pair] * max(1, self.warmup_tokens // len(long_pair))):
                self.run(SCORE_KEY, seqs)
        if sparse_kind(m) is not None:    # the sparse head at a full batch (SPLADE's [tokens, V] blocks)
            for seqs in batches:
                self.run(SPARSE_KEY, seqs)

    def run(self, key: tuple, seqs: list) -> "np.ndarray":
        """One packed batch through the model -> numpy [B, D] (embeddings) or [B, C] (logits), fp32."""
        kind, arg, *rest = key
        if kind == SCORE:           # tokenized pairs: the cross-encoder packs them with their token types
            return self.model.score_seqs(seqs).float().cpu().numpy()
        batch = pack(seqs, self.model.config.position_offset)
        if kind in ROW_OUTPUTS:     # one result of its own shape per sequence (server/output_routes.py)
            return ROW_OUTPUTS[kind](self.model, batch)
        if kind == EMBED and len(rest) == 2:
            out = self.model.embed_batch(batch, arg, task=rest[0], skip=rest[1])
        elif kind == EMBED and rest:
            out = self.model.embed_batch(batch, arg, task=rest[0])
        elif kind == EMBED:
            out = self.model.embed_batch(batch, arg)
        elif kind == CLASSIFY:
            out = self.model.classify_batch(batch)
        else:
            raise ValueError(f"unknown batch kind {kind!r}")
        return out.float().cpu().numpy()

    def _run_and_report(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        try:
            out = self.run(batch.key, batch.seqs)
        except Exception as e:
            log.exception("batch of %d sequences (%d tokens) failed", batch.num_seqs, batch.num_tokens)
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            self.scheduler.fail(batch, BatchFailed(f"the batch holding this request failed: "
                                                   f"{type(e).__name__}: {e}"))
            self._probe_or_die(e)
            return
        self.scheduler.complete(batch, list(out))
        self.last_success = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_batch(batch.num_seqs, batch.num_tokens, time.perf_counter() - t0,
                                       batch.queue_times)

    def _probe_or_die(self, cause: Exception) -> None:
        try:
            self.run(embed_key(None), [self.probe_ids])
        except Exception as e:
            self._die(f"the model no longer answers (a batch failed with {type(cause).__name__}: {cause}; "
                      f"the probe after it with {type(e).__name__}: {e})")

    def _die(self, reason: str) -> None:
        log.error("worker died: %s", reason)
        self.error = reason
        self.scheduler.fail_all(WorkerDied(f"the model worker died: {reason}"))
        self._set_ready_metric()

    def _set_ready_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.ready.set(1.0 if self.ready else 0.0)
