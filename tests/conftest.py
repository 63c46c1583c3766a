"""Shared fixtures. GPU tests are marked `gpu` and skipped, with a reason, where no CUDA GPU exists."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir():
    from packformer.loading import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    import packformer

    return packformer.load(minilm_dir)
