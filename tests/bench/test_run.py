"""run_bench: every peer on the same batches, timings turned into the reported ratios, outputs checked
against the fp32 reference. Speed itself is never asserted."""
import pytest
import torch

from packformer.bench import peers as P
from packformer.bench.run import run_bench
from packformer.bench.workloads import generate_texts

EXACT_PEERS = ["hf_eager_fp32", "hf_sdpa", "bt_nested", "bt_dense", "bt_slowpath", "onnxruntime", "packformer_ref"]


@pytest.fixture(scope="module")
def result(tiny_parts):
    n = torch.get_num_threads()   # module-scoped, so set up before conftest's per-test one_thread
    torch.set_num_threads(1)
    try:
        return run_bench(tiny_parts(), workloads="tutorial_small,serve_b32", texts=generate_texts(12),
                         peers=EXACT_PEERS + ["hf_int8_dynamic", "packformer_int8", "sentence_transformers"],
                         iterations=2,
                         warmup=1, log=None)
    finally:
        torch.set_num_threads(n)


def test_the_result_describes_the_run(result):
    assert result["schema"] == "packformer.bench/1"
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["iterations"] == 2
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu_count"]
    assert result["model"]["source"] == "random:tiny" and result["model"]["weights"] == "random"
    assert [w["name"] for w in result["workloads"]] == ["tutorial_small", "serve_b32", "texts"]
    assert result["peers_requested"][0] == "packformer"


def test_workloads_carry_their_token_counts(result):
    small, serve, texts = result["workloads"]
    assert (small["real_tokens"], small["padded_tokens"], small["lengths"]) == (10, 12, [4, 6])
    assert serve["num_seqs"] == 32 and serve["real_tokens"] == 2209 and serve["padded_tokens"] == 32 * 191
    assert texts["kind"] == "texts" and texts["num_seqs"] == 12


def test_every_peer_ran_and_agrees_with_the_reference(result):
    for w in result["workloads"]:
        for name in ["packformer"] + EXACT_PEERS:
            p = w["peers"][name]
            assert p["status"] == "ok", (w["name"], name, p)
            assert p["agreement"]["agrees"], (w["name"], name, p["agreement"])
            assert p["agreement"]["rows"] == ("sequence" if w["kind"] == "texts" else "token")
        # lossy by design: it runs, and its error is measured, not hidden
        for name in ("hf_int8_dynamic", "packformer_int8"):
            q = w["peers"][name]
            assert q["status"] == "ok" and q["agreement"]["max_abs_diff"] > 0 and "int8" in q["agreement"]["criterion"]
        assert w["peers"]["packformer_int8"]["agreement"]["agrees"], w["peers"]["packformer_int8"]["agreement"]


def test_sentence_transformers_runs_end_to_end_on_texts_only(result):
    small, _, texts = result["workloads"]
    assert small["peers"]["sentence_transformers"]["status"] == "skipped"
    assert "texts" in small["peers"]["sentence_transformers"]["reason"]
    st = texts["peers"]["sentence_transformers"]
    assert st["status"] == "ok" and st["agreement"]["agrees"] and st["agreement"]["min_cosine"] > 0.9999


def _approx(x, *medians_ms):
    """Timings are stored rounded to 1e-4 ms: a ratio of them carries that rounding, which on a batch of
    tens of microseconds is more than rel=1e-3."""
    return pytest.approx(x, rel=1e-3 + sum(1e-4 / m for m in medians_ms), abs=1e-4)


def test_ratios_are_computed_from_the_medians(result):
    for w in result["workloads"]:
        pf = w["peers"]["packformer"]["timing"]["median_ms"]
        fl = w["floor"]
        assert fl["real"]["tokens"] == w["real_tokens"]
        for name, p in w["peers"].items():
            if p["status"] != "ok":
                continue
            t = p["timing"]
            m, real, padded = t["median_ms"], fl["real"]["timing"]["median_ms"], fl["padded"]["timing"]["median_ms"]
            assert len(t["times_ms"]) == t["runs"] == 2 and m == _approx(sum(t["times_ms"]) / 2, m)
            assert p["speedup_of_packformer"] == _approx(m / pf, m, pf)
            assert p["x_floor_real"] == _approx(m / real, m, real)
            assert p["x_floor_padded"] == _approx(m / padded, m, padded)
            assert p["tokens_per_s"] == _approx(w["real_tokens"] / (m / 1e3), m)
            assert t["peak_mem_mb"] is None                 # GPU only


def test_floor_counts_padding_for_padded_peers(result):
    small, serve, texts = result["workloads"]
    assert serve["floor"]["padded"]["tokens"] == 32 * 191 and serve["floor"]["real"]["tokens"] == 2209
    assert texts["floor"]["padded"]["tokens"] == texts["padded_tokens"]


def test_a_missing_package_skips_the_peer_with_an_install_line(tiny_parts, monkeypatch):
    spec = P.PEERS["onnxruntime"]
    monkeypatch.setitem(P.PEERS, "onnxruntime", P.PeerSpec("onnxruntime", spec.build, ("no_such_module_xyz",),
                                                           "pip install onnxruntime", spec.devices))
    r = run_bench(tiny_parts(), workloads="tutorial_small", peers="ort", iterations=1, warmup=0, floor=False, log=None)
    p = r["workloads"][0]["peers"]["onnxruntime"]
    assert p["status"] == "skipped" and "pip install onnxruntime" in p["reason"]
    assert r["workloads"][0]["peers"]["packformer"]["status"] == "ok"


def test_a_broken_peer_is_reported_and_the_others_still_run(tiny_parts, monkeypatch):
    def boom(ctx):
        raise RuntimeError("exploded while building")
    monkeypatch.setitem(P.PEERS, "bt_dense", P.PeerSpec("bt_dense", boom))
    r = run_bench(tiny_parts(), workloads="tutorial_small", peers="bt_dense,bt_nested", iterations=1, warmup=0,
                  floor=False, log=None)
    peers = r["workloads"][0]["peers"]
    assert peers["bt_dense"] == {"status": "failed", "error": "RuntimeError: exploded while building"}
    assert peers["bt_nested"]["status"] == "ok"


def test_peers_that_do_not_fit_the_device_say_so():
    assert "cpu only" in P.unavailable("hf_int8_dynamic", torch.device("cuda"))
    assert "cpu only" in P.unavailable("onnxruntime", torch.device("cuda"))
    assert P.unavailable("bt_nested", torch.device("cuda")) is None


def test_peer_names_resolve_with_aliases_and_packformer_first():
    assert P.resolve_peers("hf_eager,bt,hf_eager_fp32", torch.device("cpu")) == ["packformer", "hf_eager_fp32",
                                                                                  "bt_nested"]
    assert P.resolve_peers(None, torch.device("cuda"))[:2] == ["packformer", "hf_eager_fp32"]
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        P.resolve_peers("nope", torch.device("cpu"))


@pytest.mark.slow
def test_compiled_transformers_peer_agrees(tiny_parts):
    r = run_bench(tiny_parts(), workloads="tutorial_small", peers="hf_sdpa_compiled", iterations=1, warmup=1,
                  floor=False, log=None)
    p = r["workloads"][0]["peers"]["hf_sdpa_compiled"]
    assert p["status"] == "ok" and p["agreement"]["agrees"]


def test_sentence_transformers_folder_runs_as_itself_and_agrees():
    # the built-in all-MiniLM-L6-v2 is a sentence-transformers folder: SentenceTransformer(folder) is the peer
    r = run_bench(None, workloads=[], texts=["Hello world", "How are you!", "a longer text about rivers " * 9],
                  peers="st", iterations=1, warmup=0, floor=False, log=None)
    p = r["workloads"][0]["peers"]["sentence_transformers"]
    assert p["status"] == "ok" and p["notes"].startswith("SentenceTransformer(/") and p["agreement"]["agrees"]


def test_bench_takes_fp8_as_a_peer_not_as_a_dtype():
    from packformer.bench.run import run_bench

    with pytest.raises(ValueError, match="--peers packformer,packformer_fp8"):
        run_bench("random:minilm-l6", ["serve_b32"], ["packformer"], "cpu", "float8")
