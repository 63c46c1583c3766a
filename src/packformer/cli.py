"""The `packformer` command: each subcommand lives in packformer/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `packformer --help`.
COMMANDS = ["encode", "classify", "rerank", "info", "serve", "bench-serve", "embed-dataset", "tutorial", "bench", "profile"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="packformer", description="Padding-free transformer-encoder inference.")
    p.add_argument("--version", action="version", version=f"packformer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"packformer.commands.{name.replace('-', '_')}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, KeyError, ImportError) as e:
        # user errors get one clear line, not a traceback
        print(f"packformer {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
