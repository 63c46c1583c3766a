"""The real all-mpnet-base-v2 (sentence-transformers folder): packformer's token ids equal the folder's
own tokenizer's (MPNet lowercases; over-long texts are cut to max_seq_length 384 with <s> and </s> kept)
and `encode()` equals SentenceTransformer(folder).encode to 1e-5 (fp32) on multilingual, emoji, empty,
whitespace and over-length texts, in one batch and one text at a time, on both CPU paths.

modules.json names a 2_Normalize module whose folder the published model does not ship; sentence-
transformers builds Normalize without it, and packformer normalises because modules.json names it."""
from __future__ import annotations

import numpy as np
import pytest

import packformer
from tests.real_weights import mpnet_folder

st_mod = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

MAX_SEQ_LENGTH = 384          # sentence_bert_config.json
LONG = " ".join(["Packed batches never pad, so a long document costs only its own tokens."] * 150)  # ~2,000 words
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café NAÏVE résumé: MPNet LOWERCASES this sentence.",
    "Der schnelle braune Fuchs springt über den faulen Hund; die Straße ist groß.",
    "我们今天去公园散步，天气非常好。",
    "ذهبت إلى المكتبة لأقرأ كتابًا جديدًا.",
    "Москва — столица России, зимой там очень холодно.",
    "I love pizza 🍕🍕 and rockets 🚀! 👍🏽",
    LONG,
    "",
    "   \t\n  ",
    "ok",
    "Relative positions beyond one hundred and twenty-eight tokens share the last bucket, " * 3,
]


@pytest.fixture(scope="module")
def folder():
    return mpnet_folder()


@pytest.fixture(scope="module")
def st(folder):
    return st_mod.SentenceTransformer(str(folder), device="cpu")


@pytest.fixture(scope="module")
def reference(st):
    # one text per call: no padding to 384, so the reference costs what the texts cost
    return st.encode(TEXTS, batch_size=1)                                             # [N, 768] fp32


@pytest.fixture(scope="module")
def models(folder):
    """fast -> the model, each loaded once for this file."""
    return {fast: packformer.load(folder, fast=fast) for fast in (True, False)}


def test_token_ids_equal_the_folders_tokenizer_with_truncation(models, st):
    m = models[True]
    assert m.max_seq_length == st.max_seq_length == MAX_SEQ_LENGTH
    ours = m.token_ids(TEXTS)
    want = st.tokenizer(TEXTS, truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]
    assert ours == want
    long = ours[TEXTS.index(LONG)]
    assert len(long) == MAX_SEQ_LENGTH and long[0] == 0 and long[-1] == 2                # <s> ... </s>
    assert ours[TEXTS.index("")] == [0, 2] and ours[TEXTS.index("   \t\n  ")] == [0, 2]
    assert ours[1] == m.token_ids([TEXTS[1].lower()])[0]                                  # lowercased
    assert len(m.tokenizer.encode_raw([LONG])[0]) > 2000                                # it was cut


def test_pooling_and_normalize_follow_modules_json(folder, models, st):
    assert [type(x).__name__ for x in st] == ["Transformer", "Pooling", "Normalize"]
    assert not (folder / "2_Normalize").exists()        # named in modules.json, not shipped
    m = models[True]
    assert (m.pooler.mode, m.pooler.normalize) == ("mean", True)
    assert (m.config.family, m.config.position_offset, m.config.type_vocab_size) == ("mpnet", 2, 0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_encode_equals_sentence_transformers(models, reference, fast):
    m = models[fast]
    batched = m.encode(TEXTS)
    alone = np.stack([m.encode(t) for t in TEXTS])
    errs = {"batch": float(np.abs(batched - reference).max()), "one by one": float(np.abs(alone - reference).max())}
    print(f"all-mpnet-base-v2 ({'fast' if fast else 'reference'}) max abs error vs sentence-transformers: {errs}")
    assert max(errs.values()) <= 1e-5, errs
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
