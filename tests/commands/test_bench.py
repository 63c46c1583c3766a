"""`packformer bench` on a tiny shape: table on stdout, JSON and PNG in --out, clear errors."""
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
    torch.set_num_threads(1)   # a tiny model on a shared 2-core machine: speed is not what is tested
    yield
    torch.set_num_threads(n)


def main(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    return rc, buf.getvalue()


def test_bench_writes_a_table_json_and_png(tmp_path):
    rc, out = main(["bench", "random:tiny", "--workloads", "tutorial_big", "--peers", "hf_sdpa,bt_nested",
                    "--iterations", "2", "--out", str(tmp_path)])
    assert rc == 0
    assert "floor (real)" in out and "packformer speedup" in out and "hf_sdpa" in out
    r = json.loads((tmp_path / "bench-tiny-cpu-float32.json").read_text())
    assert (tmp_path / "bench-tiny-cpu-float32.png").stat().st_size > 1000
    (w,) = r["workloads"]
    assert w["name"] == "tutorial_big" and w["padded_tokens"] == 645 and set(w["floor"]) == {"real", "padded"}
    assert [n for n in w["peers"]] == ["packformer", "hf_sdpa", "bt_nested"]
    pf = w["peers"]["packformer"]["timing"]["median_ms"]
    for name, p in w["peers"].items():
        assert p["status"] == "ok" and p["agreement"]["agrees"]
        assert p["speedup_of_packformer"] == pytest.approx(p["timing"]["median_ms"] / pf, rel=1e-3)


def test_bench_json_flag_prints_only_json():
    rc, out = main(["bench", "random:tiny", "--workloads", "tutorial_small", "--peers", "packformer_ref",
                    "--iterations", "1", "--no-floor", "--threads", "2", "--json"])
    assert rc == 0
    r = json.loads(out)
    assert r["machine"]["torch_threads"] == 2 and torch.get_num_threads() == 1   # set for the run, then restored
    assert r["workloads"][0]["floor"] is None and "packformer_ref" in r["workloads"][0]["peers"]


def test_bench_texts_file_is_an_end_to_end_workload(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("Hello world\n\nHow are you!\nrivers and gardens in winter\n")
    rc, out = main(["bench", "random:tiny", "--workloads", "", "--texts", str(f), "--peers", "hf_sdpa",
                    "--iterations", "1", "--batch-size", "2", "--json"])
    assert rc == 0
    (w,) = json.loads(out)["workloads"]
    assert w["name"] == "texts:texts.txt" and w["kind"] == "texts" and w["num_seqs"] == 3
    assert w["peers"]["hf_sdpa"]["agreement"]["rows"] == "sequence"


@pytest.mark.parametrize("args, msg", [
    (["--workloads", "serve_b99"], "unknown workload 'serve_b99'"),
    (["--peers", "hf_fast"], "unknown peer 'hf_fast'"),
    (["--texts", "/no/such/file.txt"], "texts file not found"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_arguments_get_one_clear_line(args, msg, capsys):
    rc = cli.main(["bench", "random:tiny", "--iterations", "1", *args])
    assert rc == 1
    assert msg in capsys.readouterr().err
