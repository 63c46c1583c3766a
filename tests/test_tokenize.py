"""Tokenizers: texts -> id lists with special tokens -> packed batches, with the truncation rules.

SentencePieceTokenizer follows the fairseq/torchtext XLM-R convention; it is checked against
transformers' XLMRobertaTokenizer built from the same sentencepiece file (trained here, offline).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from packformer.tokenize import HFTokenizer, SentencePieceTokenizer, check_texts

TEXTS = ["kato mire", "Hello\tworld\nagain", "ｆｕｌｌ width ①", "", " ", "a  b", "e\u0301 é", "▁ka",
         "zedru schü 日本語 kapa " * 3]


def train_spm(folder, model_type: str = "unigram", vocab_size: int = 200):
    """A small sentencepiece model on generated text, written as folder/sentencepiece.bpe.model
    (XLM-R's file name, so transformers can build its tokenizer from the folder)."""
    import sentencepiece as spm

    rnd = random.Random(0)
    syl = ["ka", "to", "mi", "re", "su", "no", "ha", "ze", "lu", "pa", "qi", "vo", "ya", "ce", "dru", "sch",
           "ü", "é", "ï", "日", "本", "語"]
    words = ["".join(rnd.choice(syl) for _ in range(rnd.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sentencepiece.bpe"),
                                   vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
                                   minloglevel=2)
    return folder / "sentencepiece.bpe.model"


@pytest.fixture(scope="module")
def unigram_spm(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm_unigram"), "unigram")


@pytest.fixture(scope="module")
def bpe_spm(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm_bpe"), "bpe")


# ---- input checking ---------------------------------------------------------------------------
def test_check_texts_accepts_a_str_or_a_list_of_str():
    assert check_texts("a") == ["a"]
    assert check_texts(("a", "")) == ["a", ""]
    assert check_texts([]) == []


@pytest.mark.parametrize("bad, msg", [(["a", 3], r"texts\[1\] is int"), ([None], r"texts\[0\] is NoneType"),
                                      (b"a", "got bytes"), (5, "got int")])
def test_check_texts_names_the_bad_item(bad, msg):
    with pytest.raises(TypeError, match=msg):
        check_texts(bad)


def test_a_lone_surrogate_is_named_with_its_text_and_position():
    # a JSON body can carry "\ud800": a str in Python, but no character, and UTF-8 cannot encode it
    with pytest.raises(ValueError, match=r"texts\[1\] holds '\\ud800' at position 3: a lone surrogate"):
        check_texts(["fine", "abc\ud800"])
    with pytest.raises(ValueError, match=r"the text holds '\\udfff' at position 0"):
        check_texts("\udfff")
    # JSON's escaped surrogate pair decodes to one character, which passes like any other
    assert check_texts(json.loads('["é 北京", "\\ud83d\\ude80"]')) == ["é 北京", "🚀"]


# ---- sentencepiece (XLM-R) --------------------------------------------------------------------
def test_sentencepiece_ids_equal_transformers_xlmr_tokenizer(unigram_spm):
    from transformers import XLMRobertaTokenizer

    ref = XLMRobertaTokenizer.from_pretrained(str(unigram_spm.parent))
    ours = SentencePieceTokenizer(unigram_spm)
    assert ours.encode_raw(TEXTS) == [ref(t)["input_ids"] for t in TEXTS]
    # the corpus has no capital letters, so "Hello" holds an unknown piece: it must map to <unk>=3
    assert 3 in ours.encode_raw(["Hello"])[0]


def test_special_token_strings_in_text_are_plain_text(unigram_spm):
    """torchtext runs sentencepiece on the raw text, so a literal "<s>" is characters, not id 0
    (transformers instead matches added tokens in the text: the one intended difference)."""
    ids = SentencePieceTokenizer(unigram_spm).encode_raw(["<s> x </s>"])[0]
    assert ids[0] == 0 and ids[-1] == 2 and 0 not in ids[1:-1] and 2 not in ids[1:-1]


@pytest.mark.parametrize("model", ["unigram_spm", "bpe_spm"])
def test_fairseq_convention(model, request):
    """<s>=0 <pad>=1 </s>=2 <unk>=3, then spm id + 1; spm's own <unk> (id 0) becomes 3."""
    import sentencepiece as spm

    path = request.getfixturevalue(model)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = SentencePieceTokenizer(path)
    assert (tok.BOS, tok.PAD, tok.EOS, tok.UNK) == (0, 1, 2, 3)
    assert tok.pad_id == 1 and tok.position_offset == 2 and tok.num_special == 2
    assert tok.vocab_size == sp.get_piece_size() + 1
    for text, ids in zip(TEXTS + ["Hello"], tok.encode_raw(TEXTS + ["Hello"])):
        expected = [0] + [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)] + [2]
        assert ids == expected, text


def test_truncation_keeps_bos_and_eos(unigram_spm):
    tok = SentencePieceTokenizer(unigram_spm)
    long_text = "zedru schü kapa " * 20
    full = tok.encode_raw([long_text])[0]
    assert len(full) > 16
    short, cut = tok.encode(["kato", long_text], max_length=16)
    assert short == tok.encode_raw(["kato"])[0]
    # torchtext: Truncate(max_length - 2) on the content, then add <s> and </s>
    assert cut == [0] + full[1:-1][:14] + [2]


def test_truncate_false_names_index_and_length(unigram_spm):
    tok = SentencePieceTokenizer(unigram_spm)
    long_text = "zedru schü kapa " * 20
    n = len(tok.encode_raw([long_text])[0])
    with pytest.raises(ValueError, match=rf"texts\[1\] has {n} tokens, more than the model's maximum of 16"):
        tok.encode(["kato", long_text, long_text], max_length=16, truncate=False)
    assert tok.encode([long_text], max_length=n, truncate=False)[0] == tok.encode_raw([long_text])[0]


def test_empty_input_and_empty_text(unigram_spm):
    tok = SentencePieceTokenizer(unigram_spm)
    assert tok.encode([], max_length=8) == []
    assert tok.encode([""], max_length=8) == [[0, 2]]


def test_pack_numbers_positions_after_the_pad_id(unigram_spm):
    tok = SentencePieceTokenizer(unigram_spm)
    batch = tok.pack(["kato mire", "", "zedru"], max_length=32)
    lens = [len(s) for s in tok.encode_raw(["kato mire", "", "zedru"])]
    assert batch.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert batch.positions.tolist() == [2 + i for n in lens for i in range(n)]
    assert batch.input_ids.dtype == torch.int64 and batch.token_type_ids is None


def test_missing_sentencepiece_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentencepiece model not found"):
        SentencePieceTokenizer(tmp_path / "nope.model")


# ---- Hugging Face tokenizers (the built-in MiniLM's WordPiece) --------------------------------
def test_hf_tokenizer_equals_transformers_with_truncation(minilm_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(minilm_dir))
    tok = HFTokenizer.from_folder(minilm_dir, pad_id=0)
    texts = ["Hello world", "", "A much longer sentence that will certainly be cut short here."]
    assert tok.encode(texts, max_length=512) == [ref(t)["input_ids"] for t in texts]
    cut = tok.encode(texts, max_length=8)
    assert cut == [ref(t, truncation=True, max_length=8)["input_ids"] for t in texts]
    assert cut[2][0] == ref.cls_token_id and cut[2][-1] == ref.sep_token_id and len(cut[2]) == 8
