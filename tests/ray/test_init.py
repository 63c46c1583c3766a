"""packformer.ray without Ray: importable, and calling it says what to install (runs where Ray is absent, e.g. CI)."""
from __future__ import annotations

import sys

import pytest


def test_missing_ray_gives_an_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed
    import packformer.ray
    from packformer.cli import main

    with pytest.raises(ImportError, match=r'pip install -e "\.\[ray\]"'):
        packformer.ray.embed_dataset("in.jsonl", "out")
    assert main(["embed-dataset", "--input", "in.jsonl", "--output", "out"]) == 1
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
