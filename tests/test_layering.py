"""The library does not depend on its benchmarks: only `packformer.bench` itself and the commands
that run benchmarks (`packformer bench`, `bench-serve`, `tutorial`, `profile`) import it, and loading
a model, encoding and serving never do."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import packformer

SRC = Path(packformer.__file__).parent
BENCH_COMMANDS = {"commands/bench.py", "commands/bench_serve.py", "commands/tutorial.py", "commands/profile.py"}


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the packformer modules a source file imports (relative imports resolved)."""
    package = ["packformer", *path.relative_to(SRC).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_no_library_module_imports_the_benchmarks():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("bench/") or rel in BENCH_COMMANDS:
            continue
        bad = sorted(n for n in _imported_modules(path) if n == "packformer.bench" or n.startswith("packformer.bench."))
        if bad:
            offenders[rel] = bad
    assert not offenders, offenders


def test_the_import_scan_sees_relative_imports_of_the_benchmarks():
    # the scan above is only worth something if it resolves `from ..bench import x` in a subpackage
    assert "packformer.bench.workloads" in _imported_modules(SRC / "commands" / "bench.py")


def test_loading_encoding_and_the_server_app_leave_the_benchmarks_unimported():
    code = ("import sys, packformer\n"
            "m = packformer.load()\n"
            "m.encode(['hello world', 'a second text'])\n"
            "import packformer.server.app, packformer.cli\n"
            "print(sorted(n for n in sys.modules if n.startswith('packformer.bench')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
