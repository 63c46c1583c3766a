"""`packformer profile`: top operators by self time for one batch, per peer, and Chrome traces."""
import contextlib
import io
import json

import pytest
import torch

from packformer import cli
from packformer.config import PRESETS, EncoderConfig

TINY = EncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", TINY)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def profile(*args: str) -> tuple[int, str]:
    """`packformer profile random:tiny --workload tutorial_small ARGS` -> (exit code, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["profile", "random:tiny", "--workload", "tutorial_small", *args])
    return rc, buf.getvalue()


def test_profile_prints_tables_and_writes_traces_and_json(tmp_path):
    rc, out = profile("--peers", "packformer,bt_nested", "--iterations", "2", "--top", "8", "--trace",
                      str(tmp_path / "trace.json"), "--out", str(tmp_path))
    assert rc == 0
    assert out.count("Self CPU time total") == 2
    r = json.loads((tmp_path / "profile-tutorial_small-cpu.json").read_text())
    assert r["workload"]["name"] == "tutorial_small" and r["iterations"] == 2
    for name in ("packformer", "bt_nested"):
        p = r["peers"][name]
        assert p["status"] == "ok" and 0 < len(p["top_ops"]) <= 8 and p["sort_by"] == "self_cpu_time_total"
        selfs = [op["self_cpu_ms"] for op in p["top_ops"]]
        assert selfs == sorted(selfs, reverse=True)
        trace = json.loads((tmp_path / f"trace.{name}.json").read_text())
        assert trace["traceEvents"]


def test_profile_of_a_text_only_peer_is_skipped_with_the_reason():
    rc, out = profile("--peers", "st,packformer", "--iterations", "1", "--json")
    r = json.loads(out)
    assert rc == 0 and r["peers"]["sentence_transformers"]["status"] == "skipped"
    assert "texts" in r["peers"]["sentence_transformers"]["reason"]


def test_profile_breakdown_prints_categories_by_peer_and_writes_them_to_json(tmp_path):
    rc, out = profile("--peers", "packformer,floor", "--iterations", "1", "--top", "5", "--breakdown", "--eager",
                      "--out", str(tmp_path))
    assert rc == 0
    table = out[out.index("ms per forward by kernel category"):out.index("wrote ")]
    header, _, *rows = table.strip().splitlines()[1:]
    assert header.split() == ["category", "packformer", "floor"]
    labels = [r.split("  ")[0].strip() for r in rows]
    assert labels[0] == "gemm" and "attention" in labels
    assert labels[-3:] == ["total kernels", "wall (no profiler)", "× floor GEMMs"]
    assert rows[labels.index("× floor GEMMs")].split()[-1] == "1"          # the floor against itself
    r = json.loads((tmp_path / "profile-tutorial_small-cpu.json").read_text())
    assert r["eager"] is True and set(r["breakdown"]) == {"packformer", "floor"}
    assert r["breakdown"]["packformer"]["gemm"] > 0 and r["breakdown"]["floor"]["attention"] == 0
    assert r["wall_ms"]["packformer"] > 0 and r["x_floor_gemm"]["floor"] == 1.0
    assert r["peers"]["floor"]["notes"].startswith("GEMM floor")


def test_profile_without_breakdown_prints_no_breakdown_table():
    rc, out = profile("--peers", "floor", "--iterations", "1", "--json")
    r = json.loads(out)
    assert rc == 0 and "breakdown" not in r and r["peers"]["floor"]["categories"]["gemm"] > 0
