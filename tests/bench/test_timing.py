"""measure(): warm-up calls are not timed, the median is of the timed calls, the last output comes back."""
import pytest

from packformer.bench.timing import measure


def counter():
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)
    return fn, calls


def test_warmup_then_iterations_and_the_last_output():
    fn, calls = counter()
    t, out = measure(fn, "cpu", iterations=5, warmup=2)
    assert len(calls) == 7 and out == 7
    assert t.runs == 5 == len(t.times_ms) and t.warmup == 2
    assert t.min_ms <= t.median_ms <= t.max_ms
    assert t.median_ms == sorted(t.times_ms)[2]
    assert t.peak_mem_mb is None


def test_max_seconds_stops_early_but_keeps_min_runs():
    fn, calls = counter()
    t, _ = measure(fn, "cpu", iterations=50, warmup=0, max_seconds=0.0, min_runs=3)
    assert t.runs == 3 and len(calls) == 3


def test_no_warmup_uses_the_first_timed_call_as_first_call():
    fn, _ = counter()
    t, _ = measure(fn, "cpu", iterations=2, warmup=0)
    assert t.first_call_ms == t.times_ms[0]
    d = t.to_dict()
    assert set(d) >= {"median_ms", "min_ms", "max_ms", "runs", "warmup", "first_call_ms", "times_ms", "peak_mem_mb"}


@pytest.mark.parametrize("kw, msg", [({"iterations": 0}, "iterations"), ({"warmup": -1}, "warmup")])
def test_bad_counts_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        measure(lambda: None, "cpu", **{"iterations": 1, **kw})
