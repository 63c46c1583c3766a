"""Reading a model folder's files with errors that name the file: json's, safetensors' and the Rust
tokenizer's own errors say what is wrong inside a file but not which file, and a folder holds several."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class ModelFileError(ValueError):
    """A file of a model folder is unreadable: corrupt, truncated, or not what its name says."""


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON: {e}") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ModelFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
