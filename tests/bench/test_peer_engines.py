"""The embedding engines as bench peers (Infinity torch and ONNX, FastEmbed): installed, each embeds the
same texts as packformer from the same weights, to fp32 precision; not installed, each is skipped with the
line that installs it. They live in the `peers` extra (their own environment: numpy < 2), so CI skips
the agreement tests, saying why."""
import importlib.util

import pytest
import torch

from packformer.bench import peers as P
from packformer.bench.run import run_bench

ENGINES = ["infinity_torch", "infinity_onnx", "fastembed"]
CPU = torch.device("cpu")
# short, long, and one past all-MiniLM-L6-v2's 256-token max_seq_length (truncation must match too)
TEXTS = ["Hello world", "How are you!", "a longer text about rivers and gardens in winter " * 6, "river " * 300]


def _installed_or_skip(name: str) -> None:
    why = P.unavailable(name, CPU)
    if why:
        pytest.skip(f"{name} {why}")


@pytest.mark.parametrize("name", ENGINES)
def test_each_engine_agrees_with_packformer_on_the_real_model(name):
    _installed_or_skip(name)
    r = run_bench(None, workloads=[], texts=TEXTS, peers=name, iterations=1, warmup=0, floor=False, log=None)
    p = r["workloads"][0]["peers"][name]
    assert p["status"] == "ok", p
    assert p["agreement"]["min_cosine"] >= 0.9999 and p["agreement"]["agrees"], p["agreement"]
    assert p["dtype"] == "float32" and p["notes"]
    assert r["peer_packages"]["numpy"] and all(r["peer_packages"].values())    # versions on record


@pytest.mark.parametrize("name", ENGINES)
def test_each_engine_runs_texts_only(tiny_parts, name):
    _installed_or_skip(name)
    r = run_bench(tiny_parts(), workloads="tutorial_small", peers=name, iterations=1, warmup=0, floor=False,
                  log=None)
    p = r["workloads"][0]["peers"][name]
    assert p["status"] == "skipped" and "text workload" in p["reason"]


@pytest.mark.parametrize("name", ["infinity_torch", "fastembed"])
def test_a_model_that_does_not_normalize_is_matched_too(tiny_parts, name):
    # random weights, mean pooling, no Normalize: Infinity always normalizes (judged against the normalized
    # reference, and says so); FastEmbed is told the model's normalization
    _installed_or_skip(name)
    r = run_bench(tiny_parts(), workloads=[], texts=TEXTS[:3], peers=name, iterations=1, warmup=0, floor=False,
                  log=None)
    p = r["workloads"][0]["peers"][name]
    assert p["status"] == "ok" and p["agreement"]["agrees"], p
    assert ("reference" in p["agreement"]) == (name == "infinity_torch")


@pytest.mark.parametrize("name, package", [("infinity_torch", "infinity_emb"), ("infinity_onnx", "infinity_emb"),
                                           ("fastembed", "fastembed")])
def test_a_missing_engine_is_skipped_with_its_install_line(monkeypatch, name, package):
    # every other requirement present: the line names just this package
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == package else object())
    why = P.unavailable(name, CPU)
    assert why.startswith(f"not installed ({package} missing)") and 'pip install -e ".[peers]"' in why
    assert ("infinity-emb[server,torch,optimum]" in why) == (package == "infinity_emb")
    r = run_bench(None, workloads=[], texts=TEXTS[:2], peers=name, iterations=1, warmup=0, floor=False, log=None)
    assert r["workloads"][0]["peers"][name] == {"status": "skipped", "reason": why}


def test_the_onnx_engines_run_on_cpu_only(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object())     # as if installed
    for name in ("infinity_onnx", "fastembed"):
        assert "cpu only" in P.unavailable(name, torch.device("cuda"))
    assert P.unavailable("infinity_torch", torch.device("cuda")) is None


def test_infinity_is_told_the_models_pooling_never_auto():
    from packformer.bench.peer_infinity import pooling_method

    assert pooling_method("mean") == "mean" and pooling_method("cls") == "cls"
    with pytest.raises(P.NotApplicable, match="mean or cls only"):
        pooling_method("max")


def test_infinity_alias_names_the_torch_engine():
    assert P.canonical_peers("infinity,fastembed") == ["infinity_torch", "fastembed"]
