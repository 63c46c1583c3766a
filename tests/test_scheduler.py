"""The token-budget batching queue: budgets, FIFO order, per-request results in input order, failure
isolation, drain on close, and no torch inside."""
from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import CancelledError

import pytest

import packformer.scheduler as scheduler_module
from packformer.scheduler import Scheduler, SchedulerClosed


def ids(n: int, tag: int = 0) -> list[int]:
    return [tag] * n


def run_all(s: Scheduler, fn=lambda seq: (seq[0], len(seq))) -> list:
    """Consume every queued batch, answering each sequence with fn(seq); returns the batches seen."""
    seen = []
    while (b := s.next_batch(timeout=0)) is not None:
        seen.append(b)
        s.complete(b, [fn(q) for q in b.seqs])
    return seen


def test_scheduler_module_imports_no_torch():
    # load the file on its own (not via the packformer package, whose __init__ imports torch)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sched', {scheduler_module.__file__!r})\n"
        "m = sys.modules['sched'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "s = m.Scheduler(8); f = s.submit([[1, 2]]); b = s.next_batch(0); s.complete(b, ['x'])\n"
        "assert f.result(1) == ['x']\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_results_come_back_per_request_in_input_order():
    s = Scheduler(max_batch_tokens=100)
    f1 = s.submit([ids(3, 1), ids(5, 2), ids(2, 3)])
    f2 = s.submit([ids(4, 4)])
    batches = run_all(s)
    assert len(batches) == 1                       # 14 tokens fit one batch
    assert f1.result(0) == [(1, 3), (2, 5), (3, 2)]
    assert f2.result(0) == [(4, 4)]


def test_batches_respect_token_budget_in_arrival_order():
    s = Scheduler(max_batch_tokens=10)
    futs = [s.submit([ids(n, i)]) for i, n in enumerate([4, 4, 4, 9, 1, 1])]
    batches = run_all(s)
    assert [[q[0] for q in b.seqs] for b in batches] == [[0, 1], [2], [3, 4], [5]]
    assert all(b.num_tokens <= 10 for b in batches)
    assert [f.result(0)[0][0] for f in futs] == list(range(6))


def test_a_sequence_longer_than_the_budget_runs_alone():
    s = Scheduler(max_batch_tokens=8)
    s.submit([ids(2, 0)])
    s.submit([ids(20, 1)])
    s.submit([ids(2, 2)])
    batches = run_all(s)
    assert [len(b.seqs) for b in batches] == [1, 1, 1]
    assert batches[1].num_tokens == 20


def test_max_batch_requests_caps_sequences_per_batch():
    s = Scheduler(max_batch_tokens=1000, max_batch_requests=3)
    f = s.submit([ids(1, i) for i in range(8)])
    batches = run_all(s)
    assert [b.num_seqs for b in batches] == [3, 3, 2]
    assert [r[0] for r in f.result(0)] == list(range(8))


def test_one_request_may_span_batches():
    s = Scheduler(max_batch_tokens=6)
    f = s.submit([ids(4, 0), ids(4, 1), ids(4, 2)])
    assert len(run_all(s)) == 3
    assert [r[0] for r in f.result(0)] == [0, 1, 2]


def test_keys_never_share_a_batch_and_the_oldest_key_goes_first():
    s = Scheduler(max_batch_tokens=100)
    s.submit([ids(1, 0)], key="classify")
    s.submit([ids(1, 1)], key="embed")
    s.submit([ids(1, 2)], key="classify")
    batches = run_all(s)
    assert [(b.key, [q[0] for q in b.seqs]) for b in batches] == [("classify", [0, 2]), ("embed", [1])]


def test_a_failed_batch_fails_only_its_requests():
    s = Scheduler(max_batch_tokens=4)
    a = s.submit([ids(4, 0)])
    b = s.submit([ids(4, 1), ids(4, 2)])   # spans two batches; the first of them fails
    c = s.submit([ids(4, 3)])
    first = s.next_batch(0)
    s.complete(first, ["a"])
    second = s.next_batch(0)
    s.fail(second, RuntimeError("boom"))
    rest = run_all(s, fn=lambda q: q[0])
    assert a.result(0) == ["a"]
    with pytest.raises(RuntimeError, match="boom"):
        b.result(0)
    assert [bb.seqs for bb in rest] == [[ids(4, 3)]]   # b's other sequence was dropped, not run
    assert c.result(0) == [3]
    assert s.queued_sequences == 0 and s.queued_tokens == 0


def test_cancelled_requests_are_not_run():
    s = Scheduler(max_batch_tokens=100)
    a = s.submit([ids(2, 0)])
    b = s.submit([ids(2, 1)])
    assert a.cancel()
    batches = run_all(s, fn=lambda q: q[0])
    assert [bb.seqs for bb in batches] == [[ids(2, 1)]]
    assert b.result(0) == [1]
    with pytest.raises(CancelledError):
        a.result(0)


def test_close_drains_queued_work_then_rejects_and_ends():
    s = Scheduler(max_batch_tokens=100)
    f = s.submit([ids(2, 0)])
    s.close()
    with pytest.raises(SchedulerClosed):
        s.submit([ids(1, 1)])
    b = s.next_batch(timeout=5)
    s.complete(b, ["done"])
    assert f.result(0) == ["done"]
    assert s.next_batch(timeout=5) is None       # closed and empty: returns at once


def test_fail_all_fails_queued_requests_and_closes():
    s = Scheduler(max_batch_tokens=100)
    f = s.submit([ids(2, 0)])
    s.fail_all(RuntimeError("worker died"))
    with pytest.raises(RuntimeError, match="worker died"):
        f.result(0)
    with pytest.raises(SchedulerClosed, match="worker died"):
        s.submit([ids(1, 1)])
    assert s.next_batch(timeout=5) is None


def test_next_batch_times_out_when_idle_and_wakes_on_submit():
    s = Scheduler(max_batch_tokens=100)
    assert s.next_batch(timeout=0.01) is None
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_batch(timeout=30)))
    t.start()
    s.submit([ids(1, 7)])
    t.join(30)
    assert not t.is_alive() and got[0].seqs == [ids(1, 7)]


def test_empty_request_resolves_at_once():
    s = Scheduler(max_batch_tokens=10)
    assert s.submit([]).result(0) == []
    assert s.next_batch(timeout=0) is None


def test_queue_times_are_measured_from_submission():
    now = [0.0]
    s = Scheduler(max_batch_tokens=10, clock=lambda: now[0])
    s.submit([ids(1)])
    now[0] = 2.5
    s.submit([ids(1)])
    now[0] = 3.0
    assert s.next_batch(0).queue_times == [3.0, 0.5]


def test_complete_checks_result_count():
    s = Scheduler(max_batch_tokens=10)
    s.submit([ids(1), ids(1)])
    b = s.next_batch(0)
    with pytest.raises(ValueError, match="2 sequences but 1 results"):
        s.complete(b, ["x"])


@pytest.mark.parametrize("kwargs", [dict(max_batch_tokens=0), dict(max_batch_tokens=8, max_batch_requests=0)])
def test_bad_budgets_are_rejected(kwargs):
    with pytest.raises(ValueError, match="must be positive"):
        Scheduler(**kwargs)


def test_many_producers_one_consumer_lose_and_duplicate_nothing():
    s = Scheduler(max_batch_tokens=50, max_batch_requests=7)
    n_threads, per_thread = 8, 50
    futures: dict[tuple[int, int], object] = {}
    lock = threading.Lock()
    seen_batches = []

    def produce(t):
        for j in range(per_thread):
            seqs = [[t, j, k] + [0] * ((t + j + k) % 9) for k in range(1 + (j % 3))]
            f = s.submit(seqs)
            with lock:
                futures[(t, j)] = (f, seqs)

    def consume():
        while (b := s.next_batch(timeout=10)) is not None:
            seen_batches.append(b.num_tokens)
            s.complete(b, [tuple(q[:3]) for q in b.seqs])

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for p in producers:
        p.start()
    for p in producers:
        p.join(30)
    s.close()
    consumer.join(30)
    assert not consumer.is_alive()
    assert len(futures) == n_threads * per_thread
    for (t, j), (f, seqs) in futures.items():
        assert f.result(0) == [tuple(q[:3]) for q in seqs]
    assert max(seen_batches) <= 50
