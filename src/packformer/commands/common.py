"""Options shared by the subcommands that load a model."""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path


def int_in(low: int, high: int | None = None):
    """An argparse type: an int in [low, high] (high None: no upper bound), else argparse's usage error
    naming the option and the range. Without it, `--port 99999` would be handed to the socket layer, which
    wraps it to port 34463 without a word."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            want = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    return parse


def finite_number(positive: bool):
    """An argparse type: a finite number (seconds, a share of CPUs or GPUs), > 0 (positive) or >= 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}")
        return value

    return parse


POSITIVE = int_in(1)
NON_NEGATIVE = int_in(0)
PORT = int_in(0, 65535)
POSITIVE_NUMBER = finite_number(positive=True)
NON_NEGATIVE_NUMBER = finite_number(positive=False)


def add_model_options(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="model folder, torchtext .pt file or 'random:<preset>' (default: built-in all-MiniLM-L6-v2)")
    else:
        p.add_argument("--model", "-m", default=None,
                       help="model folder, torchtext .pt file or 'random:<preset>' (default: built-in all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU; on CUDA fp16, bf16 for "
                   "Qwen3 / Gemma 3); float8: e4m3 GEMMs on fp8 GPUs (sm89+), checked against fp16 at load")
    p.add_argument("--force-fp8", action="store_true", help="with --dtype float8: run fp8 even where the load-time "
                   "check finds it below cosine 0.999")
    p.add_argument("--max-batch-tokens", type=POSITIVE, default=None, help="token budget of one packed batch")
    p.add_argument("--spm", default=None, help="sentencepiece model for a torchtext .pt checkpoint")
    p.add_argument("--num-heads", type=POSITIVE, default=None, help="attention heads of a torchtext .pt checkpoint "
                   "(default: from its size: 12 for base, 16 for large)")


def load_model(args):
    import packformer

    extra = {k: v for k, v in (("spm", args.spm), ("num_heads", args.num_heads)) if v is not None}
    if extra and not str(args.model or "").endswith((".pt", ".pth")):
        raise ValueError("--spm and --num-heads apply to torchtext .pt checkpoints only")
    task = getattr(args, "task", None)          # encode / serve --task: the model's default task
    return packformer.load(args.model, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens,
                           task=task, force_fp8=getattr(args, "force_fp8", False), **extra)


def add_text_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="texts to process")
    p.add_argument("--input", "-i", default=None, help="a file with one text per line, or - for stdin")
    p.add_argument("--no-truncate", action="store_true", help="fail on over-long texts instead of truncating")


def read_texts(args) -> list[str]:
    """The texts of --input (one per line; a file, or - for stdin) or of the arguments. Input that is not
    UTF-8 is refused naming the line and the byte (decoding it line by line would name neither)."""
    if args.input and args.texts:
        raise ValueError("give texts as arguments or with --input, not both")
    if args.input:
        name = "stdin" if args.input == "-" else args.input
        raw = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{name}, line {line}, is not UTF-8: byte 0x{raw[e.start]:02x} ({e.reason})") from None
        # one text per line, with the newlines a text-mode file would see (\n, \r\n and \r)
        return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]
    if not args.texts:
        raise ValueError("no texts: pass them as arguments or with --input FILE|-")
    return list(args.texts)
