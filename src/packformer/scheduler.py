"""Token-budget batching queue: requests of token-id lists in, batch plans out.

Why it exists: many small HTTP requests should run as few packed batches. Each request is split into
its sequences; the worker asks for the next batch and gets the oldest waiting sequences that fit under
`max_batch_tokens` (and `max_batch_requests` sequences), all of one `key` (e.g. embed vs classify), in
arrival order. Batching is continuous: whatever queued while the previous batch ran goes into the next
one, with no waiting timer. A request's future resolves, in its input order, once all its sequences
have run; if any batch holding one of them fails, the request fails and its other sequences are dropped.

This module is plain Python (threads and concurrent.futures, no torch), so it can be tested and reused
without a model; the worker that turns batch plans into model calls lives in packformer.server.worker.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence


class SchedulerClosed(RuntimeError):
    """Raised by `submit` once the scheduler no longer accepts work (shutting down, or its worker died)."""


@dataclass(eq=False)
class _Request:
    seqs: list[Sequence[int]]
    key: Hashable
    future: Future
    enqueued_at: float
    results: list[Any] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.seqs)
        self.remaining = len(self.seqs)


@dataclass(eq=False)
class _Entry:
    request: _Request
    index: int              # position of this sequence in its request
    tokens: int
    seq_no: int             # global arrival number: FIFO across keys


@dataclass(eq=False)
class Batch:
    """A batch plan: sequences of one key, in arrival order, within the token and sequence budgets."""

    key: Hashable
    entries: list[_Entry]
    started_at: float

    @property
    def seqs(self) -> list[Sequence[int]]:
        return [e.request.seqs[e.index] for e in self.entries]

    @property
    def num_seqs(self) -> int:
        return len(self.entries)

    @property
    def num_tokens(self) -> int:
        return sum(e.tokens for e in self.entries)

    @property
    def queue_times(self) -> list[float]:
        """Seconds each sequence waited between submission and the start of this batch."""
        return [self.started_at - e.request.enqueued_at for e in self.entries]


class Scheduler:
    """Thread-safe FIFO of sequences, handed out as token-budget batches.

    Producers call `submit(seqs, key)` and wait on the returned Future (it yields a list of per-sequence
    results in input order). One consumer (the model worker) loops on `next_batch()`, runs the batch,
    and reports back with `complete(batch, results)` or `fail(batch, exc)`.
    """

    def __init__(self, max_batch_tokens: int, max_batch_requests: int | None = None,
                 clock=time.monotonic):
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        if max_batch_requests is not None and max_batch_requests <= 0:
            raise ValueError(f"max_batch_requests must be positive, got {max_batch_requests}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self._clock = clock
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque[_Entry]] = {}
        self._seq_no = itertools.count()
        self._queued_seqs = 0
        self._queued_tokens = 0
        self._closed_reason: BaseException | None = None

    # ---- producer side ------------------------------------------------------------------------
    def submit(self, seqs: Sequence[Sequence[int]], key: Hashable = None) -> Future:
        """Queue a request's sequences; the Future resolves to their results in input order.
        An empty request resolves at once to []. Raises SchedulerClosed once closed."""
        fut: Future = Future()
        req = _Request(list(seqs), key, fut, self._clock())
        if not req.seqs:
            fut.set_result([])
            return fut
        with self._cond:
            if self._closed_reason is not None:
                raise SchedulerClosed(str(self._closed_reason)) from self._closed_reason
            q = self._queues.setdefault(key, deque())
            for i, s in enumerate(req.seqs):
                q.append(_Entry(req, i, len(s), next(self._seq_no)))
                self._queued_tokens += len(s)
            self._queued_seqs += len(req.seqs)
            self._cond.notify()
        return fut

    # ---- consumer side ------------------------------------------------------------------------
    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Block until work is queued, then take the oldest sequences that fit the budgets, all of the
        oldest sequence's key. A single sequence longer than the token budget gets a batch of its own.
        Returns None on timeout, or when the scheduler is closed and nothing is left to run."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                self._drop_finished_heads()
                if self._queued_seqs:
                    return self._take_batch()
                if self._closed_reason is not None:
                    return None
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def _drop_finished_heads(self) -> None:
        """Forget queued sequences whose request already ended (failed in another batch, or cancelled)."""
        for key in list(self._queues):
            q = self._queues[key]
            while q and q[0].request.future.done():
                self._forget(q.popleft())
            if not q:
                del self._queues[key]

    def _forget(self, e: _Entry) -> None:
        self._queued_seqs -= 1
        self._queued_tokens -= e.tokens

    def _take_batch(self) -> Batch:
        key = min(self._queues, key=lambda k: self._queues[k][0].seq_no)
        q = self._queues[key]
        entries: list[_Entry] = []
        tokens = 0
        while q:
            e = q[0]
            if e.request.future.done():
                self._forget(q.popleft())
                continue
            if entries and (tokens + e.tokens > self.max_batch_tokens
                            or (self.max_batch_requests is not None and len(entries) >= self.max_batch_requests)):
                break
            self._forget(q.popleft())
            entries.append(e)
            tokens += e.tokens
        if not q:
            del self._queues[key]
        return Batch(key, entries, self._clock())

    def complete(self, batch: Batch, results: Sequence[Any]) -> None:
        """Hand back one result per sequence of `batch`, aligned with `batch.seqs`."""
        if len(results) != batch.num_seqs:
            raise ValueError(f"batch has {batch.num_seqs} sequences but {len(results)} results were given")
        finished = []
        with self._cond:        # several consumers may complete parts of one request
            for e, r in zip(batch.entries, results):
                req = e.request
                if req.future.done():
                    continue
                req.results[e.index] = r
                req.remaining -= 1
                if req.remaining == 0:
                    finished.append(req)
        for req in finished:
            _settle(req.future, result=req.results)

    def fail(self, batch: Batch, exc: BaseException) -> None:
        """Fail every request with a sequence in `batch`; their sequences still queued are dropped."""
        for e in batch.entries:
            _settle(e.request.future, exc=exc)

    def close(self, reason: BaseException | None = None) -> None:
        """Stop accepting requests; what is queued is still handed out (drain)."""
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason or SchedulerClosed("the server is shutting down")
            self._cond.notify_all()

    def fail_all(self, exc: BaseException) -> None:
        """Close and fail every queued request with `exc` (the worker died, or a drain timed out)."""
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = exc
            entries = [e for q in self._queues.values() for e in q]
            self._queues.clear()
            self._queued_seqs = self._queued_tokens = 0
            self._cond.notify_all()
        for e in entries:
            _settle(e.request.future, exc=exc)

    # ---- introspection ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def queued_sequences(self) -> int:
        return self._queued_seqs

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens


def _settle(fut: Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (a waiter may have cancelled it meanwhile)."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
