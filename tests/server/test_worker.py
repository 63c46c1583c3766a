"""The model worker: results equal model.encode / classify whatever the batch, a failing batch fails only
its own requests, a model that stops answering kills the worker (no hang), and stop() drains."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import packformer
from packformer.loading import random_parts
from packformer.scheduler import Scheduler, SchedulerClosed
from packformer.server.worker import CLASSIFY_KEY, BatchFailed, Worker, WorkerDied, embed_key

TEXTS = ["a short one", "packed batches never pad", "the river", "x " * 120, "model token batch packed padding"]
POISON = 4242


class Faulty:
    """The real model, except that batches holding the POISON id raise, and `broken` makes all raise."""

    def __init__(self, model):
        self._m, self.broken, self.calls = model, False, 0

    def __getattr__(self, name):
        return getattr(self._m, name)

    def embed_batch(self, batch, normalize=None):
        self.calls += 1
        if self.broken or bool((batch.input_ids == POISON).any()):
            raise RuntimeError("injected failure")
        return self._m.embed_batch(batch, normalize)


def started(model, budget=512, **kw) -> Worker:
    w = Worker(model, Scheduler(budget, **kw))
    w.start()
    assert w.wait_ready(120), w.error
    return w


@pytest.mark.parametrize("normalize", [None, True, False])
def test_results_equal_model_encode_whatever_shares_the_batch(minilm, normalize):
    w = started(minilm)
    try:
        ids = minilm.token_ids(TEXTS)
        # submit before running anything: the requests are packed together, and cut by the 512 budget
        futs = [w.scheduler.submit(ids[:2], embed_key(normalize)), w.scheduler.submit(ids[2:], embed_key(normalize))]
        got = np.stack([r for f in futs for r in f.result(60)])
        ref = minilm.encode(TEXTS, normalize_embeddings=normalize)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    finally:
        w.stop()


def test_classify_results_equal_model_classify():
    model = packformer.Model(random_parts("minilm-l6", num_labels=3))
    w = started(model)
    try:
        got = np.stack(w.scheduler.submit(model.token_ids(TEXTS), CLASSIFY_KEY).result(60))
        np.testing.assert_allclose(got, model.classify(TEXTS), atol=1e-5, rtol=0)
    finally:
        w.stop()


def test_a_failing_batch_fails_only_its_requests_and_the_worker_keeps_serving(minilm):
    faulty = Faulty(minilm)
    w = Worker(faulty, Scheduler(64, max_batch_requests=1))   # one sequence per batch
    w.start()
    assert w.wait_ready(120)
    try:
        ids = minilm.token_ids(TEXTS[:3])
        good1 = w.scheduler.submit([ids[0]], embed_key(None))
        bad = w.scheduler.submit([ids[1], [101, POISON, 102], ids[2]], embed_key(None))
        good2 = w.scheduler.submit([ids[2]], embed_key(None))
        with pytest.raises(BatchFailed, match="injected failure"):
            bad.result(60)
        np.testing.assert_allclose(np.stack(good1.result(60) + good2.result(60)),
                                   minilm.encode([TEXTS[0], TEXTS[2]]), atol=1e-5, rtol=0)
        assert w.alive and w.ready and w.state == "ready"
    finally:
        w.stop()


def test_a_model_that_stops_answering_kills_the_worker_and_fails_waiters(minilm):
    faulty = Faulty(minilm)
    sched = Scheduler(512)
    w = Worker(faulty, sched)
    w.start()
    assert w.wait_ready(120)
    faulty.broken = True
    first = sched.submit([[101, 102]], embed_key(None))
    with pytest.raises(BatchFailed):
        first.result(60)
    w._thread.join(60)
    assert w.state == "dead" and not w.alive and not w.ready
    assert "no longer answers" in w.error
    with pytest.raises(SchedulerClosed, match="worker died"):
        sched.submit([[101, 102]], embed_key(None))


def test_warm_up_failure_means_dead_not_ready(minilm):
    faulty = Faulty(minilm)
    faulty.broken = True
    w = Worker(faulty, Scheduler(512))
    w.start()
    w._thread.join(60)
    assert not w.wait_ready(0) and w.state == "dead" and "warm-up failed" in w.error


def test_stop_drains_queued_work_then_ends_the_thread(minilm):
    gate = threading.Event()

    class Slow(Faulty):
        def embed_batch(self, batch, normalize=None):
            gate.wait(60)
            return super().embed_batch(batch, normalize)

    slow = Slow(minilm)
    gate.set()
    w = Worker(slow, Scheduler(512, max_batch_requests=1))
    w.start()
    assert w.wait_ready(120)
    gate.clear()                       # the next batch blocks until we let it go
    ids = minilm.token_ids(TEXTS[:3])
    futs = [w.scheduler.submit([s], embed_key(None)) for s in ids]
    stopper = threading.Thread(target=w.stop, kwargs=dict(drain=True, timeout=60))
    stopper.start()
    with pytest.raises(SchedulerClosed):
        for _ in range(200):           # stop() closes the scheduler at once
            w.scheduler.submit([ids[0]], embed_key(None))
            threading.Event().wait(0.01)
    gate.set()
    stopper.join(60)
    assert not stopper.is_alive() and w.state == "stopped"
    np.testing.assert_allclose(np.stack([f.result(0)[0] for f in futs]), minilm.encode(TEXTS[:3]), atol=1e-5, rtol=0)


def test_stop_without_drain_fails_queued_requests(minilm):
    w = Worker(Faulty(minilm), Scheduler(512))
    fut = w.scheduler.submit([[101, 102]], embed_key(None))   # queued before the worker ever starts
    w.stop(drain=False)
    with pytest.raises(WorkerDied, match="shutting down"):
        fut.result(0)


def test_a_runner_that_prepares_shapes_is_warmed_before_ready(minilm):
    calls = []

    class ShapeRunner:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, batch, meta):
            return self.inner(batch, meta)

        def warmup(self, shapes):
            calls.append(list(shapes))

    class WithRunner(Faulty):
        runner = ShapeRunner(minilm.runner)

        def embed_batch(self, batch, normalize=None):
            assert calls, "embed ran before the runner was warmed"
            return super().embed_batch(batch, normalize)

    w = Worker(WithRunner(minilm), Scheduler(1024))
    w.start()
    assert w.wait_ready(120)
    w.stop()
    assert calls == [[(64, 1), (64, 8), (64, 32), (256, 1), (256, 8), (256, 32), (256, 128),
                      (1024, 1), (1024, 8), (1024, 32), (1024, 128)]]
