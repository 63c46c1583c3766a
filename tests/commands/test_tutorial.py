"""`packformer tutorial` on a tiny XLM-R shape: profiler tables and a summary on stdout, and a JSON whose
speedups come from its own timings and whose outputs all agree with the slow path."""
import json

import pytest
import torch

from packformer import cli
from packformer.config import PRESETS

TINY_XLMR = PRESETS["xlmr-large"].replace(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4,
                                           intermediate_size=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model on a shared 2-core machine: speed is not what is tested
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(PRESETS, "tiny-xlmr", TINY_XLMR)
            import io, contextlib
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = cli.main(["tutorial", "--shape", "tiny-xlmr", "--iterations", "2", "--profile-iterations", "1",
                               "--top", "5", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return rc, buf.getvalue(), json.loads((out / "tutorial-cpu.json").read_text()), out


def test_it_succeeds_and_writes_json_and_png(run):
    rc, _, _, out = run
    assert rc == 0
    assert (out / "tutorial-cpu.png").stat().st_size > 1000


def test_it_prints_profiler_tables_per_run_and_a_summary(run):
    _, stdout, result, _ = run
    assert stdout.count("Self CPU time total") == 10          # 5 runs x 2 batches
    assert "Summary" in stdout and "BT fast path, sparsity on" in stdout
    assert "RANDOM" in stdout and "eval mode with autograd recording" in stdout


def test_the_json_holds_every_run_of_both_batches(run):
    _, _, r, _ = run
    assert r["schema"] == "packformer.tutorial/1" and r["model"]["weights"] == "random"
    assert r["padding_value"] == 1 and r["batches"]["small"]["lengths"] == [4, 6]
    assert r["batches"]["big"]["lengths"][:2] == [4, 6] and len(r["batches"]["big"]["lengths"]) == 3
    keys = [(e["device"], e["batch"], e["run"]) for e in r["results"]]
    assert keys == [("cpu", b, k) for b in ("small", "big") for k in
                    ("slow_path", "bt_fast_dense", "bt_fast_sparse", "packformer_padded", "packformer_packed")]
    for e in r["results"]:
        assert {"ms_per_iter", "speedup_vs_slow_path", "max_abs_diff_logits", "max_abs_diff_features", "timing",
                "logits", "agreement", "profile"} <= set(e)
        assert len(e["logits"]) == (2 if e["batch"] == "small" else 3) and len(e["logits"][0]) == 2


def test_speedups_come_from_the_timings(run):
    _, _, r, _ = run
    for e in r["results"]:
        slow = next(s for s in r["results"] if s["batch"] == e["batch"] and s["run"] == "slow_path")
        assert e["ms_per_iter"] == pytest.approx(e["timing"]["median_ms"], rel=1e-3)
        assert e["speedup_vs_slow_path"] == pytest.approx(slow["ms_per_iter"] / e["ms_per_iter"], rel=1e-3)
        assert e["timing"]["runs"] == 2


def test_outputs_agree_with_the_slow_path_and_each_run_took_its_path(run):
    _, _, r, _ = run
    for e in r["results"]:
        assert e["agreement"]["agrees"] and e["max_abs_diff_logits"] < 1e-4, e["run"]
        if e["run"].startswith("bt_fast"):
            assert e["bt_fastpath_kernel_seen"] is True
        if e["run"] == "slow_path":
            assert e["bt_fastpath_kernel_seen"] is False and e["max_abs_diff_logits"] == 0
