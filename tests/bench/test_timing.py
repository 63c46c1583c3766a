"""measure(): warm-up calls are not timed, the median is of the timed calls, the last output comes back."""
import gc
import types
import weakref

import pytest

from packformer.bench import timing
from packformer.bench.timing import measure


class FakeClock:
    """Stands in for the `time` module inside timing.py: time passes only while `fn` runs, by the
    durations it is given, so every figure `measure` reports is known in advance."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=c.perf_counter, process_time=c.process_time))
    return c


def timed_calls(clock, seconds, cpu_share=0.5):
    """A function whose k-th call takes seconds[k] of wall time (cpu_share of it as CPU time) and
    returns k + 1; and the list of calls made."""
    calls = []

    def fn():
        k = len(calls)
        calls.append(k)
        clock.wall += seconds[k]
        clock.cpu += seconds[k] * cpu_share
        return k + 1
    return fn, calls


def test_the_warmup_calls_are_not_timed_and_the_median_is_of_the_timed_calls(clock):
    # two slow warm-up calls (1 s, 0.5 s), then 5 timed calls of 4, 1, 3, 2, 15 ms (mean 5, median 3)
    fn, calls = timed_calls(clock, [1.0, 0.5, 0.004, 0.001, 0.003, 0.002, 0.015])
    t, out = measure(fn, "cpu", iterations=5, warmup=2)
    assert len(calls) == 7 and out == 7                      # the output of the last call
    assert t.runs == 5 and t.warmup == 2
    assert t.times_ms == pytest.approx([4, 1, 3, 2, 15])
    assert t.median_ms == pytest.approx(3) and t.min_ms == pytest.approx(1) and t.max_ms == pytest.approx(15)
    assert t.cpu_median_ms == pytest.approx(1.5)
    assert t.first_call_ms == pytest.approx(1000)            # the first warm-up call only
    assert t.peak_mem_mb is None and t.peak_extra_mb is None


def test_an_even_number_of_runs_has_the_mean_of_the_middle_two_as_median(clock):
    fn, _ = timed_calls(clock, [0.010, 0.001, 0.004, 0.002])
    t, _ = measure(fn, "cpu", iterations=4, warmup=0)
    assert t.median_ms == pytest.approx(3)


def test_max_seconds_counts_only_the_timed_calls(clock):
    # a 10 s warm-up does not use up the 25 ms budget; 10 ms calls stop once 30 ms are spent
    fn, calls = timed_calls(clock, [10.0] + [0.010] * 50)
    t, _ = measure(fn, "cpu", iterations=50, warmup=1, max_seconds=0.025, min_runs=1)
    assert t.runs == 3 and len(calls) == 1 + 3


@pytest.mark.parametrize("iterations, min_runs, runs", [(50, 3, 3), (2, 5, 2)])
def test_max_seconds_stops_early_but_keeps_min_runs_and_never_exceeds_iterations(clock, iterations, min_runs, runs):
    fn, calls = timed_calls(clock, [0.010] * 50)
    t, _ = measure(fn, "cpu", iterations=iterations, warmup=0, max_seconds=0.0, min_runs=min_runs)
    assert t.runs == runs == len(t.times_ms) and len(calls) == runs


def test_without_max_seconds_every_iteration_runs(clock):
    fn, calls = timed_calls(clock, [1.0] * 20)
    t, _ = measure(fn, "cpu", iterations=20, warmup=0)
    assert t.runs == 20 and len(calls) == 20


def test_no_warmup_uses_the_first_timed_call_as_first_call(clock):
    fn, _ = timed_calls(clock, [0.007, 0.002])
    t, _ = measure(fn, "cpu", iterations=2, warmup=0)
    assert t.first_call_ms == pytest.approx(7) == t.times_ms[0]
    d = t.to_dict()
    assert set(d) >= {"median_ms", "min_ms", "max_ms", "runs", "warmup", "first_call_ms", "times_ms", "peak_mem_mb"}
    assert d["median_ms"] == 4.5 and d["times_ms"] == [7.0, 2.0]            # rounded to 4 decimals


def test_the_previous_output_is_released_before_the_next_call():
    # so that the peak memory of the timed calls is that of one call, not two calls' outputs
    class Out:
        pass

    previous = []

    def fn():
        gc.collect()
        assert all(ref() is None for ref in previous), "an earlier output is still alive"
        out = Out()
        previous.append(weakref.ref(out))
        return out
    _, out = measure(fn, "cpu", iterations=3, warmup=2)
    assert previous[-1]() is out


@pytest.mark.parametrize("kw, msg", [({"iterations": 0}, "iterations"), ({"warmup": -1}, "warmup")])
def test_bad_counts_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        measure(lambda: None, "cpu", **{"iterations": 1, **kw})
