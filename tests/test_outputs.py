"""encode()'s prompts, Matryoshka truncation and quantized outputs against SentenceTransformer.encode on
the real all-MiniLM-L6-v2, in folders whose config_sentence_transformers.json (prompts, default prompt,
truncate_dim) and Pooling config (include_prompt, mode) are written here."""
from __future__ import annotations

import logging

import json

import numpy as np
import pytest
import torch

import packformer
from packformer import outputs
from tests.prompt_folders import st_folder

PROMPTS = {"query": "query: ", "passage": "passage: ", "instruct": "Represent this sentence for searching: ",
           "none": ""}
TEXTS = ["The quick brown fox.", "packed batches never pad", "a", "river flows " * 12, "Hello, world! How are you?", ""]
LONG = TEXTS + ["river " * 300]          # one input cut to the model's 256 tokens, prompt included
TOL = 1e-5


def st_model(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """(folder, packformer model, sentence-transformers model): prompts with a default, include_prompt=True."""
    d = st_folder(tmp_path_factory.mktemp("prompted") / "m", PROMPTS, default="query")
    return d, packformer.load(d), st_model(d)


@pytest.fixture(scope="module", params=["mean", "cls", "max"])
def excluded(request, tmp_path_factory):
    """include_prompt=False with each pooling mode."""
    d = st_folder(tmp_path_factory.mktemp(f"excl-{request.param}") / "m", PROMPTS, include_prompt=False,
                  mode=request.param)
    return d, packformer.load(d), st_model(d)


def close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= tol, np.abs(a - b).max()


# ---- prompts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"prompt_name": "instruct"}, {"prompt_name": "none"}, {"prompt": ""},
                                {"prompt": "Search: ", "prompt_name": "passage"}],
                         ids=["default", "instruct", "empty-name", "empty-prompt", "both"])
def test_prompts_match_sentence_transformers(prompted, kw):
    _, m, st = prompted
    texts = LONG if not kw else TEXTS
    close(m.encode(texts, **kw), st.encode(texts, **kw))


def test_the_default_prompt_applies_and_changes_the_embedding(prompted):
    _, m, _ = prompted
    plain = m.encode(TEXTS, prompt="")
    close(m.encode(TEXTS), m.encode(["query: " + t for t in TEXTS], prompt=""))
    assert np.abs(m.encode(TEXTS) - plain).max() > 1e-2


def test_prompt_beside_prompt_name_wins_with_a_warning(prompted, caplog):
    _, m, _ = prompted
    with caplog.at_level(logging.WARNING, logger="packformer.outputs"):
        both = m.encode(TEXTS[:2], prompt="Search: ", prompt_name="passage")
    close(both, m.encode(TEXTS[:2], prompt="Search: "), 0)
    assert "Ignoring the `prompt_name`" in caplog.text


def test_unknown_prompt_name_lists_the_known_ones(prompted):
    _, m, _ = prompted
    with pytest.raises(ValueError, match=r"unknown prompt_name 'nope'.*'query', 'passage', 'instruct', 'none'"):
        m.encode("x", prompt_name="nope")


def test_a_prompt_with_a_lone_surrogate_is_named_as_the_prompt(minilm):
    with pytest.raises(ValueError, match=r"prompt holds '\\ud800' at position 2: a lone surrogate"):
        minilm.encode("x", prompt="q:\ud800")


def test_a_model_without_prompts_says_so(minilm):
    with pytest.raises(ValueError, match="defines no prompts"):
        minilm.encode("x", prompt_name="query")


def test_model_and_info_report_prompts(prompted, minilm):
    _, m, _ = prompted
    assert m.prompts == PROMPTS and m.default_prompt_name == "query" and m.include_prompt is True
    info = m.info()
    assert info["prompts"] == PROMPTS and info["default_prompt_name"] == "query" and info["truncate_dim"] is None
    assert minilm.prompts == {} and minilm.default_prompt_name is None


def test_a_default_prompt_name_missing_from_the_prompts_is_refused(tmp_path):
    d = st_folder(tmp_path / "m", {"query": "q: "}, default="passage")
    with pytest.raises(ValueError, match=r"config_sentence_transformers.json: default prompt name 'passage'"):
        packformer.load(d)


@pytest.mark.parametrize("kw", [{"prompt_name": "instruct"}, {"prompt": "query: "}, {}],
                         ids=["instruct", "prompt", "no-prompt"])
def test_include_prompt_false_leaves_the_prompt_out_of_pooling_as_st(excluded, kw):
    _, m, st = excluded
    texts = LONG if kw.get("prompt_name") else TEXTS
    close(m.encode(texts, **kw), st.encode(texts, **kw))


def test_include_prompt_false_differs_from_pooling_the_prompt(tmp_path, prompted):
    m = packformer.load(st_folder(tmp_path / "m", PROMPTS, include_prompt=False))
    _, with_prompt, _ = prompted
    assert np.abs(m.encode(TEXTS[:3], prompt_name="instruct") -
                  with_prompt.encode(TEXTS[:3], prompt_name="instruct")).max() > 1e-3


def test_prompted_text_alone_equals_batched(excluded):
    _, m, _ = excluded
    batched = m.encode(TEXTS, prompt_name="instruct")
    for i, t in enumerate(TEXTS):
        close(m.encode([t], prompt_name="instruct")[0], batched[i], 1e-6)


def test_prompt_length_counts_as_sentence_transformers(excluded):
    _, m, st = excluded
    for p in PROMPTS.values():
        if p:
            assert m.pool_skip(p) == st[0]._get_prompt_length(p)


def test_drop_prompt_on_packed_rows():
    h = torch.arange(9, dtype=torch.float32)[:, None]                 # [T=9, H=1]
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)                # lengths 4, 2, 3
    kept, kcu = outputs.drop_prompt(h, cu, 2, "mean")
    assert kept[:, 0].tolist() == [2, 3, 8] and kcu.tolist() == [0, 2, 2, 3] and kcu.dtype == cu.dtype
    kept, kcu = outputs.drop_prompt(h, cu, 2, "cls")                  # a sequence of <= skip tokens keeps its own
    assert kept[kcu[:-1].long(), 0].tolist() == [2, 4, 8]
    same = outputs.drop_prompt(h, cu, 0, "mean")
    assert same[0] is h and same[1] is cu


# ---- truncate_dim -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"truncate_dim": 128}, {"truncate_dim": 32, "normalize_embeddings": True},
                                {"truncate_dim": 384}, {"truncate_dim": 64, "prompt_name": "passage"}],
                         ids=["128", "32-normalized", "full", "64-prompted"])
def test_truncate_dim_matches_sentence_transformers(prompted, kw):
    """The folder normalizes (all-MiniLM-L6-v2 has a Normalize module): a cut vector is normalized again,
    as sentence-transformers gives it with normalize_embeddings=True."""
    _, m, st = prompted
    close(m.encode(TEXTS, **kw), st.encode(TEXTS, **dict(kw, normalize_embeddings=True)))


def test_truncation_renormalizes_only_where_the_model_normalizes(prompted, tmp_path):
    d, m, _ = prompted
    full = m.encode(TEXTS)
    cut = m.encode(TEXTS, truncate_dim=96)
    close(cut, full[:, :96] / np.linalg.norm(full[:, :96], axis=1, keepdims=True), 1e-6)
    close(np.linalg.norm(cut, axis=1), np.ones(len(TEXTS)), 1e-6)
    plain = st_folder(tmp_path / "plain", PROMPTS)           # the same model without its Normalize module
    mods = json.loads((plain / "modules.json").read_text())
    (plain / "modules.json").write_text(json.dumps([x for x in mods if not x["type"].endswith("Normalize")]))
    pm = packformer.load(plain)
    raw = pm.encode(TEXTS)
    close(pm.encode(TEXTS, truncate_dim=96), raw[:, :96], 0)          # nothing normalizes: a plain cut
    close(pm.encode(TEXTS, truncate_dim=96), st_model(plain).encode(TEXTS, truncate_dim=96))


def test_truncate_dim_at_load_and_from_the_folder(tmp_path, prompted):
    d, m, _ = prompted
    at_load = packformer.load(d, truncate_dim=100)
    assert at_load.truncate_dim == 100 and at_load.info()["truncate_dim"] == 100
    close(at_load.encode(TEXTS), m.encode(TEXTS, truncate_dim=100), 0)
    close(at_load.encode(TEXTS, truncate_dim=50), m.encode(TEXTS, truncate_dim=50), 0)    # per call wins
    f = st_folder(tmp_path / "t", PROMPTS, truncate_dim=64)
    ours, st = packformer.load(f), st_model(f)
    assert ours.truncate_dim == 64 and st.truncate_dim == 64
    close(ours.encode(TEXTS), st.encode(TEXTS, normalize_embeddings=True))
    close(packformer.load(f, truncate_dim=128).encode(TEXTS), st.encode(TEXTS, truncate_dim=128,
                                                                         normalize_embeddings=True))


@pytest.mark.parametrize("bad, err", [(0, ValueError), (385, ValueError), (-1, ValueError), (1.5, TypeError),
                                      (True, TypeError)])
def test_truncate_dim_out_of_range_is_refused(minilm, bad, err):
    with pytest.raises(err, match="truncate_dim"):
        minilm.encode("x", truncate_dim=bad)


def test_truncate_dim_beyond_the_model_is_refused_at_load(minilm_dir):
    with pytest.raises(ValueError, match="between 1 and the model's embedding dimension 384, got 500"):
        packformer.load(minilm_dir, truncate_dim=500)


# ---- precision ----------------------------------------------------------------------------------
PRECISIONS = ["float32", "int8", "uint8", "binary", "ubinary"]


def st_quantize(*a, **kw):
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(*a, **kw)


@pytest.fixture(scope="module")
def floats(minilm):
    rng = np.random.default_rng(0)
    emb = minilm.encode(TEXTS)
    calib = minilm.encode([f"calibration text number {i} " * (1 + i % 5) for i in range(40)])
    return emb, calib, np.stack([calib.min(0), calib.max(0)]) + rng.normal(0, 1e-3, (2, 384)).astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("how", ["batch", "ranges", "calibration"])
def test_quantize_equals_sentence_transformers_code_for_code(floats, precision, how):
    emb, calib, ranges = floats
    kw = {"batch": {}, "ranges": {"ranges": ranges}, "calibration": {"calibration_embeddings": calib}}[how]
    ours, ref = outputs.quantize(emb, precision, **kw), st_quantize(emb, precision=precision, **kw)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_encode_equals_sentence_transformers_exactly(prompted, precision):
    _, m, st = prompted
    kw = {"truncate_dim": 100} if precision == "binary" else {}
    ours, ref = m.encode(TEXTS, precision=precision, **kw), st.encode(TEXTS, precision=precision, **kw)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape == (len(TEXTS), (kw.get("truncate_dim", 384) + 7) // 8)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_int8_encode_is_the_quantized_float_encode(prompted, floats, precision):
    """encode(precision=...) quantizes its own fp32 output (codes equal); against ST's encode the floats
    differ by ~1e-7, so a value on a bucket edge may land one code apart."""
    _, m, st = prompted
    _, calib, ranges = floats
    fp32 = m.encode(TEXTS)
    for kw in ({}, {"ranges": ranges}, {"calibration_embeddings": calib}):
        ours = m.encode(TEXTS, precision=precision, **kw)
        np.testing.assert_array_equal(ours, outputs.quantize(fp32, precision, **kw))
    ours = m.encode(TEXTS, precision=precision, ranges=ranges)
    ref = st_quantize(st.encode(TEXTS), precision=precision, ranges=ranges)
    assert ours.dtype == ref.dtype and np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours == ref).mean() > 0.99


def test_int8_from_the_batch_depends_on_the_batch_unless_ranges_are_given(minilm, floats):
    _, _, ranges = floats
    a = minilm.encode(TEXTS[:3], precision="int8")
    b = minilm.encode(TEXTS[:3] + TEXTS[4:], precision="int8")
    assert (a != b[:3]).any()                                         # ST's default: ranges from the call
    a = minilm.encode(TEXTS[:3], precision="int8", ranges=ranges)
    b = minilm.encode(TEXTS[:3] + TEXTS[4:], precision="int8", ranges=ranges)
    np.testing.assert_array_equal(a, b[:3])
    with pytest.raises(ValueError, match="single embedding"):
        minilm.encode("one text", precision="int8")
    one = minilm.encode("one text", precision="int8", ranges=ranges)
    assert one.shape == (384,) and one.dtype == np.int8


def test_quantized_outputs_convert_to_tensor(minilm):
    t = minilm.encode(TEXTS[:2], precision="ubinary", convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (2, 48)


@pytest.mark.parametrize("bad", ["fp16", "INT8", "", None])
def test_bad_precision_is_refused_naming_the_choices(minilm, bad):
    with pytest.raises(ValueError, match="precision must be one of float32, int8, uint8, binary, ubinary"):
        minilm.encode("x", precision=bad)


def test_bad_ranges_are_refused(minilm):
    with pytest.raises(ValueError, match=r"ranges must be \[2, 384\]"):
        minilm.encode(TEXTS[:2], precision="int8", ranges=np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"calibration_embeddings must be \[N, 384\]"):
        minilm.encode(TEXTS[:2], precision="uint8", calibration_embeddings=np.zeros((5, 3)))
