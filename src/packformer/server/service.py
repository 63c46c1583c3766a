"""The serving core between HTTP and the model: input checks, tokenization on arrival, admission
(the in-flight cap), submission to the scheduler and the wait for results.

Routes stay thin and protocol-specific (TEI, OpenAI); everything they share lives here, so another
front end (e.g. a Ray Serve deployment) can reuse it with the same limits and errors.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..scheduler import Scheduler, SchedulerClosed
from ..tokenize import check_text
from .errors import APIError, too_large, unhealthy, validation
from .formats import special_wrap, wrap_token_ids
from .settings import ServerSettings
from .worker import CLASSIFY_KEY, SCORE_KEY, BatchFailed, Worker, WorkerDied, embed_key

if TYPE_CHECKING:
    from ..engine import Model
    from .metrics import Metrics

RERANKERS = ("reranking needs a cross-encoder (a CrossEncoder folder, a *ForSequenceClassification folder with one "
             "label, or a Qwen3-Reranker folder)")

# Tokenizing a small request inline costs less than a hop to a thread; big ones go to a thread so the
# event loop keeps answering.
INLINE_TOKENIZE_CHARS = 4096


def warm_task_list(model: "Model", names: tuple[str, ...]) -> list[str]:
    """ServerSettings.warm_tasks resolved against the model: 'all' is every task of its adapters; a model
    without adapters, or a task it lacks, is a ValueError naming what it has."""
    if not names:
        return []
    if model.adapters is None:
        raise ValueError(f"warm_tasks needs a model with task adapters; {model.source} has none")
    tasks = list(model.adapters.tasks) if "all" in names else [model.resolve_task(t) for t in names]
    return [t for t in tasks if t != model.task]            # the default task is warmed anyway


class InferenceService:
    def __init__(self, model: "Model", settings: ServerSettings, metrics: "Metrics | None" = None):
        if model.tokenizer is None:
            raise ValueError(f"model {model.source} has no tokenizer; the server needs one to read text")
        if settings.max_batch_tokens < model.max_seq_length:
            raise ValueError(f"max_batch_tokens ({settings.max_batch_tokens}) must hold at least one input of the "
                             f"model's maximum length ({model.max_seq_length})")
        self.model = model
        self.settings = settings
        from ..rerank import model_kind
        self.kind = model_kind(model)            # embedding / classifier / reranker: which routes it serves
        self.metrics = metrics
        self.model_name = settings.model_name or _default_name(model.source)
        self.scheduler = Scheduler(settings.max_batch_tokens, settings.max_batch_requests)
        self.worker = Worker(model, self.scheduler, metrics, warm_tasks=warm_task_list(model, settings.warm_tasks))
        # the tokenizer's own special tokens (model.token_ids would add a default task's instruction)
        self.prefix, self.suffix = special_wrap(model.tokenizer.encode([""], model.max_seq_length)[0])
        self.inflight = 0
        self._model_info = model.info()
        self._health_probe: asyncio.Future | None = None
        if metrics is not None:
            metrics.watch_queue(lambda: self.scheduler.queued_sequences, lambda: self.scheduler.queued_tokens)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; it warms the model, and the service answers 503 until that is done."""
        self.worker.start()

    def wait_warm(self) -> None:
        """Block until the worker has warmed the model (RuntimeError if it died instead): for hosts that
        must not route requests to an app before it can answer them (a Ray Serve replica)."""
        while not self.worker.wait_ready(0.5):
            if self.worker.error is not None:
                raise RuntimeError(f"the model worker died while warming up: {self.worker.error}")

    def stop(self) -> None:
        """Stop accepting work and finish what is queued (blocking: call it from a thread)."""
        self.worker.stop(drain=True, timeout=self.settings.drain_timeout_s)

    # ---- admission and checks -----------------------------------------------------------------
    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request in flight, or refuse it with 429 beyond --max-concurrent-requests.
        Called on the event loop thread only, so a plain counter is exact."""
        limit = self.settings.max_concurrent_requests
        if self.inflight >= limit:
            raise APIError(429, f"model is overloaded: {limit} requests already in flight "
                                "(--max-concurrent-requests); retry later", "overloaded")
        self.inflight += 1
        if self.metrics is not None:
            self.metrics.inflight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            if self.metrics is not None:
                self.metrics.inflight.set(self.inflight)

    def check_ready(self) -> None:
        w = self.worker
        if w.error is not None:
            raise unhealthy(f"the model worker died: {w.error}")
        if self.scheduler.closed:
            raise unhealthy("the server is shutting down")
        if not w.ready:
            raise unhealthy("the model is starting (warming up); retry shortly")

    def check_batch(self, items: Sequence, field: str) -> None:
        """422 for an empty request, an empty input, a text UTF-8 cannot encode, or more inputs than
        --max-client-batch-size."""
        if len(items) == 0:
            raise validation(f"`{field}` is empty: give at least one input")
        limit = self.settings.max_client_batch_size
        if len(items) > limit:
            raise validation(f"`{field}` has {len(items)} inputs, more than the maximum of {limit} "
                             "(--max-client-batch-size); split the request")
        for i, x in enumerate(items):
            if len(x) == 0:
                raise validation(f"`{field}[{i}]` is empty")
            if isinstance(x, str):
                try:
                    check_text(x, f"`{field}[{i}]`")
                except ValueError as e:         # a lone surrogate: JSON can carry "\ud800", UTF-8 cannot
                    raise validation(str(e)) from e

    def truncate_default(self, truncate: bool | None) -> bool:
        return self.settings.auto_truncate if truncate is None else truncate

    def resolve_task(self, task: str | None) -> str | None:
        """A request's `task` (None: the model's default, `serve --task`); 422 naming the model's tasks for
        an unknown one, or for any task on a model without task adapters."""
        if task is None:
            return getattr(self.model, "task", None)
        try:
            return self.model.resolve_task(task)
        except ValueError as e:
            raise validation(f"`task`: {e}") from e

    def resolve_prompt(self, prompt_name: str | None, task: str | None = None) -> tuple[str, int]:
        """A request's `prompt_name` (None: the model's default prompt) -> (the text put before each of its
        inputs: the prompt, else `task`'s instruction; the leading tokens left out of pooling, for a
        Pooling with include_prompt=False). 422 naming the model's prompts for an unknown name."""
        try:
            prefix = self.model.text_prefix(task, None, prompt_name)
        except ValueError as e:
            raise validation(f"`prompt_name`: {e}") from e
        return prefix, self.model.pool_skip(prefix)

    def dimensions(self, dimensions: int | None) -> int | None:
        """A request's `dimensions` (None: the model's truncate_dim, if it has one); 422 beyond its size."""
        dim = self.model.dim
        if dimensions is not None and dimensions > dim:
            raise validation(f"dimensions must be at most the model's {dim}, got {dimensions}")
        return dimensions if dimensions is not None else getattr(self.model, "truncate_dim", None)

    # ---- tokenization -------------------------------------------------------------------------
    async def token_ids(self, texts: list[str], truncate: bool, hint: str = "",
                        task: str | None = None, prefix: str | None = None) -> list[list[int]]:
        """Texts -> ids with special tokens (after `prefix`, from resolve_prompt; None: `task`'s instruction or
        the default prompt); 413 naming the input for an over-long one with truncation off (`hint` says how to
        turn truncation on for this route)."""
        kw = {"truncate": truncate} if task is None else {"truncate": truncate, "task": task}
        if prefix is not None:
            kw["prompt"] = prefix
        try:
            if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
                return self.model.token_ids(texts, **kw)
            return await asyncio.to_thread(self.model.token_ids, texts, **kw)
        except ValueError as e:
            raise too_large(f"{e}{hint}") from e

    def wrap_ids(self, seqs: list[list[int]], truncate: bool) -> list[list[int]]:
        """Pre-tokenized inputs (no special tokens) -> model ids; 422 off-vocabulary, 413 too long."""
        try:
            return wrap_token_ids(seqs, self.prefix, self.suffix, self.model.config.vocab_size,
                                  self.model.max_seq_length, truncate)
        except OverflowError as e:
            raise too_large(f"{e}; start the server with --auto-truncate to cut such inputs") from e
        except ValueError as e:
            raise validation(str(e)) from e

    # ---- running ------------------------------------------------------------------------------
    async def run(self, key: tuple, ids: list[list[int]]) -> np.ndarray:
        """Queue tokenized inputs and wait for their rows: [N, D] embeddings or [N, C] logits, input order."""
        return np.stack(await self.run_rows(key, ids))

    async def run_rows(self, key: tuple, ids: list[list[int]]) -> list:
        """Queue tokenized inputs and wait for one result per input, in input order (results of any shape:
        embedding rows, sparse vectors, token embeddings)."""
        self.check_ready()
        try:
            fut = self.scheduler.submit(ids, key)
        except SchedulerClosed as e:
            raise unhealthy(str(e)) from e
        try:
            rows = await asyncio.wrap_future(fut)
        except BatchFailed as e:
            raise APIError(500, str(e), "backend") from e
        except (WorkerDied, SchedulerClosed) as e:
            raise unhealthy(str(e)) from e
        return rows

    async def embed(self, ids: list[list[int]], normalize: bool | None, task: str | None = None,
                    skip: int = 0) -> np.ndarray:
        """`task` (resolved by resolve_task): requests of one task batch together, never with another's;
        `skip`: the prompt tokens left out of pooling (resolve_prompt), batched apart likewise."""
        self.check_embedder()
        return await self.run(embed_key(normalize, task, skip), ids)

    async def classify(self, ids: list[list[int]]) -> np.ndarray:
        if self.model.head is None:
            raise validation(f"model {self.model_name} has no classification head: /predict needs a "
                             "*ForSequenceClassification model; use /embed")
        return await self.run(CLASSIFY_KEY, ids)

    async def score(self, seqs: list) -> np.ndarray:
        """Tokenized (query, document) pairs (rerank.PairSeq) -> logits [N, C], input order. Each pair is one
        scheduler entry, so a rerank of N documents packs with other traffic under the token budget."""
        if self.kind != "reranker":
            raise validation(f"model {self.model_name} is an {self.kind} model: {RERANKERS}")
        return await self.run(SCORE_KEY, seqs)

    def check_embedder(self) -> None:
        """422 for embedding routes on a cross-encoder, naming what it serves instead."""
        if self.kind == "reranker":
            raise validation(f"model {self.model_name} is a reranker (cross-encoder): it scores (query, document) "
                             "pairs on /rerank, /v1/rerank and /v2/rerank, and does not embed texts")

    async def health(self) -> str | None:
        """None when the model answers; else why not. Shares one probe among concurrent callers and
        trusts a batch that succeeded in the last second."""
        try:
            self.check_ready()
        except APIError as e:
            return e.message
        if time.monotonic() - self.worker.last_success < 1.0:
            return None
        if self._health_probe is None or self._health_probe.done():
            # the probe runs the encoder (pooled) on every kind of model, rerankers included
            self._health_probe = asyncio.ensure_future(self.run(embed_key(None), [self.worker.probe_ids]))
            # a probe that fails after its waiters timed out must not log "exception never retrieved"
            self._health_probe.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._health_probe), self.settings.health_timeout_s)
        except asyncio.TimeoutError:
            return f"the model did not answer a probe within {self.settings.health_timeout_s:g} s"
        except APIError as e:
            return e.message
        return None

    # ---- descriptions -------------------------------------------------------------------------
    def tokens(self, texts: list[str], add_special_tokens: bool) -> list[list[dict]]:
        """TEI's /tokenize: per text, its tokens with id, text, special flag and character offsets."""
        tok = self.model.tokenizer
        rust = getattr(tok, "tok", None)
        if rust is not None:         # Hugging Face tokenizers: offsets known
            out = []
            for text, enc in zip(texts, rust.encode_batch(texts, add_special_tokens=add_special_tokens)):
                out.append([
                    {"id": i, "text": t, "special": True, "start": None, "stop": None} if sp else
                    {"id": i, "text": text[a:b], "special": False, "start": a, "stop": b}
                    for i, t, sp, (a, b) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets)])
            return out
        specials = set(self.prefix) | set(self.suffix)      # sentencepiece: ids only
        out = []
        for seq in tok.encode_raw(texts):
            seq = seq if add_special_tokens else seq[len(self.prefix): len(seq) - len(self.suffix)]
            out.append([{"id": i, "text": None, "special": i in specials, "start": None, "stop": None}
                        for i in seq])
        return out

    def info(self) -> dict:
        m, s = self._model_info, self.settings
        from .. import __version__
        from ..fast import describe_runner
        return {
            "model_id": self.model_name, "model_type": self.kind,
            "version": __version__, "source": str(m["source"]), "format": m["format"], "family": m["family"],
            "architecture": m["architecture"],
            "model_dtype": m["dtype"], "gemm_dtype": m.get("gemm_dtype", m["dtype"]),
            "fp8_accuracy": m.get("fp8_accuracy"), "device": m["device"], "dim": m["dim"],
            "max_input_length": self.model.max_seq_length, "pooling": m["pooling"], "normalize": m["normalize"],
            "labels": m["labels"], "max_batch_tokens": s.max_batch_tokens, "max_batch_requests": s.max_batch_requests,
            "max_concurrent_requests": s.max_concurrent_requests, "max_client_batch_size": s.max_client_batch_size,
            "auto_truncate": s.auto_truncate, "payload_limit": s.payload_limit, "state": self.worker.state,
            "runner": describe_runner(self.model.runner, self._runner_encoder()),   # live: graphs, replays
            "tasks": list(getattr(self.model, "tasks", ())), "task": getattr(self.model, "task", None),
            "prompts": dict(m.get("prompts") or {}), "default_prompt_name": m.get("default_prompt_name"),
            "truncate_dim": m.get("truncate_dim"),
        }

    def _runner_encoder(self):
        """The encoder the default runner was built over (a task's merged copy, or the model's own)."""
        task = getattr(self.model, "task", None)
        return self.model.task_encoder(task) if task is not None else self.model.encoder


def _default_name(source) -> str:
    from ..loading import DEFAULT_MODEL, builtin_model_dir

    s = str(source)
    if s.startswith("random:"):
        return s
    if Path(s) == builtin_model_dir():
        return DEFAULT_MODEL
    return Path(s).name or s
