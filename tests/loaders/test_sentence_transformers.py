"""sentence-transformers folders: pooling mode, Normalize and max_seq_length come from the folder,
and the result equals SentenceTransformer on the same folder."""
import json
import shutil

import numpy as np
import pytest

import packformer

st = pytest.importorskip("sentence_transformers")
TEXTS = ["Hello world", "How are you!", "", "one two three four five six seven " * 20]


def _variant(src, dst, pooling: str, normalize: bool, max_seq_length: int | None = None):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "1_Pooling" / "config.json").read_text())
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_max_tokens", "max")):
        cfg[key] = mode == pooling
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    modules = json.loads((dst / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (dst / "modules.json").write_text(json.dumps(modules))
    if max_seq_length:
        (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                   "do_lower_case": False}))
    return dst


@pytest.mark.parametrize("pooling,normalize,msl", [("cls", False, None), ("max", True, None), ("mean", False, 16)])
def test_pooling_normalize_and_max_length_follow_the_folder(tmp_path, minilm_dir, pooling, normalize, msl):
    folder = _variant(minilm_dir, tmp_path / "m", pooling, normalize, msl)
    m = packformer.load(folder)
    assert m.pooler.mode == pooling and m.pooler.normalize == normalize
    assert m.max_seq_length == (msl or 256)
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    assert np.abs(m.encode(TEXTS) - ref).max() <= 1e-5


def test_unsupported_modules_and_pooling_are_named(tmp_path, minilm_dir):
    folder = _variant(minilm_dir, tmp_path / "m", "mean", True)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules + [
        {"idx": 3, "name": "3", "path": "3_WordWeights", "type": "sentence_transformers.models.WordWeights"}]))
    with pytest.raises(ValueError, match="unsupported module types.*WordWeights"):
        packformer.load(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    cfg["pooling_mode_max_tokens"] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="exactly one of cls/mean/max"):
        packformer.load(folder)
