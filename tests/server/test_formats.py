"""Payload conversions: OpenAI base64, `dimensions` shortening, TEI predictions, pre-tokenized inputs."""
from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from packformer.server.formats import (from_base64, predictions, shorten, special_wrap, to_base64,
                                       wrap_token_ids)


def test_base64_is_little_endian_float32_like_openai():
    v = np.array([1.0, -2.5, 3.25e-3], dtype=np.float32)
    raw = base64.b64decode(to_base64(v))
    assert raw == struct.pack("<3f", *v.tolist())
    np.testing.assert_array_equal(from_base64(to_base64(v)), v)


def test_base64_from_a_big_endian_or_float64_row_is_still_little_endian_float32():
    v = np.array([0.5, -1.0], dtype=">f8")
    assert base64.b64decode(to_base64(v)) == struct.pack("<2f", 0.5, -1.0)


def test_shorten_keeps_leading_dims_and_renormalizes():
    emb = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    out = shorten(emb, 2)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])          # a zero row stays zero, no NaN
    np.testing.assert_allclose(np.linalg.norm(shorten(emb, 3), axis=1), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("d", [0, 4])
def test_shorten_rejects_dimensions_out_of_range(d):
    with pytest.raises(ValueError, match="between 1 and the model's 3"):
        shorten(np.ones((1, 3), np.float32), d)


def test_predictions_are_softmax_scores_best_first():
    logits = np.array([[0.0, 2.0, 1.0]], dtype=np.float32)
    (row,) = predictions(logits, ["a", "b", "c"])
    assert [p["label"] for p in row] == ["b", "c", "a"]
    e = np.exp([0.0, 2.0, 1.0])
    np.testing.assert_allclose([p["score"] for p in row], (e / e.sum())[[1, 2, 0]], rtol=1e-6)
    (raw,) = predictions(logits, ["a", "b", "c"], raw_scores=True)
    assert [p["score"] for p in raw] == [2.0, 1.0, 0.0]


def test_special_wrap_reads_the_tokens_around_an_empty_text():
    assert special_wrap([101, 102]) == ([101], [102])
    assert special_wrap([0, 2]) == ([0], [2])
    assert special_wrap([]) == ([], [])


def test_wrap_token_ids_adds_specials_and_checks_vocab_and_length():
    assert wrap_token_ids([[5, 6], [7]], [101], [102], 1000, 8, False) == [[101, 5, 6, 102], [101, 7, 102]]
    with pytest.raises(ValueError, match=r"input\[1\] has token ids outside the vocabulary \[0, 1000\): \[1000, -1\]"):
        wrap_token_ids([[5], [1000, -1]], [101], [102], 1000, 8, False)
    with pytest.raises(OverflowError, match=r"input\[0\] has 9 tokens .* maximum of 8"):
        wrap_token_ids([list(range(7))], [101], [102], 1000, 8, False)
    assert wrap_token_ids([list(range(7))], [101], [102], 1000, 8, True) == [[101, 0, 1, 2, 3, 4, 5, 102]]
