"""Cross-encoders: packformer.load() of every cross-encoder folder format gives predict() / rank() equal to
sentence-transformers' CrossEncoder on the same folder (fp32, within 1e-4 on random weights, 1e-5 on real
MiniLM weights), with the folder's pair template, token types, `longest_first` truncation and activation;
a pair's score never depends on its batch; bad input gets a clear error."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import packformer
from packformer.engine import Model
from packformer.rerank import CrossEncoderModel, PairSeq, check_pairs, is_cross_encoder_folder, model_kind
from packformer.tokenize import longest_first
from tests.rerank_folders import (DOCUMENTS, IDENTITY, MAX_LENGTH, QUERIES, bert_cross_encoder, bert_hf, save_as,
                                  xlmr_hf)
from tests.test_tokenize import train_spm

CrossEncoder = pytest.importorskip("sentence_transformers").CrossEncoder
PAIRS = [(q, d) for q in QUERIES for d in DOCUMENTS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cross-encoders")


@pytest.fixture(scope="module")
def bert_hf_dir(root):
    return bert_hf(root / "bert-raw")


@pytest.fixture(scope="module")
def spm_file(root):
    return train_spm(root / "spm")


@pytest.fixture(scope="module")
def xlmr_hf_dir(root, spm_file):
    return xlmr_hf(root / "xlmr-raw", spm_file)


@pytest.fixture(scope="module")
def folders(root, bert_hf_dir, xlmr_hf_dir, spm_file):
    """name -> cross-encoder folder: BERT in every format, XLM-R as sentence-transformers 6 writes it and
    with only its sentencepiece file (packformer's sentencepiece tokenizer; the reference reads tokenizer.json)."""
    out = {f"bert-{fmt}": save_as(bert_hf_dir, root / f"bert-{fmt}", fmt) for fmt in ("st6", "st4", "st3", "hf")}
    out["xlmr-st6"] = save_as(xlmr_hf_dir, root / "xlmr-st6", "st6")
    spm_only = root / "xlmr-spm"
    shutil.copytree(out["xlmr-st6"], spm_only)
    (spm_only / "tokenizer.json").unlink()
    shutil.copy(spm_file, spm_only / "sentencepiece.bpe.model")
    out["xlmr-spm"] = spm_only
    return out


def reference_folder(name: str, folders) -> str:
    return str(folders["xlmr-st6" if name == "xlmr-spm" else name])


def close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=atol, rtol=0)


# ---- tokenization ---------------------------------------------------------------------------------
def test_longest_first_cuts_pairs_as_the_rust_tokenizers_do():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(200)} | {"[UNK]": 200, "[CLS]": 201, "[SEP]": 202}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 201), ("[SEP]", 202)])
    checked = 0
    for max_length in (3, 4, 9, 16, 17):
        tok.enable_truncation(max_length, strategy="longest_first")
        for n1 in range(0, 22, 3):
            for n2 in range(0, 22, 2):
                e = tok.encode(" ".join(f"w{i}" for i in range(n1)), " ".join(f"w{100 + i}" for i in range(n2)))
                got = (sum(i < 100 for i in e.ids), sum(100 <= i < 200 for i in e.ids))
                assert longest_first(n1, n2, max_length - 3) == got, (max_length, n1, n2)
                checked += 1
    assert checked > 300


@pytest.mark.parametrize("name", ["bert-st6", "xlmr-st6", "xlmr-spm"])
def test_pairs_use_the_folder_template_token_types_and_longest_first_truncation(folders, name):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(reference_folder(name, folders))
    m = packformer.load(folders[name])
    assert isinstance(m, CrossEncoderModel) and m.max_seq_length == MAX_LENGTH
    enc = ref([q for q, _ in PAIRS], [d for _, d in PAIRS], truncation="longest_first", max_length=MAX_LENGTH)
    seqs = m.pair_ids(PAIRS)
    assert [s.ids for s in seqs] == enc["input_ids"]
    assert any(len(s) == MAX_LENGTH for s in seqs)                     # some pairs were cut
    if name.startswith("bert"):             # [CLS] q [SEP] d [SEP]: types 0 then 1
        assert [s.types for s in seqs] == enc["token_type_ids"]
        assert seqs[0].ids[0] == 101 and seqs[0].ids.count(102) == 2
    else:                                   # <s> q </s></s> d </s>: no token types
        assert all(s.types is None for s in seqs)
        assert seqs[0].ids[0] == 0 and seqs[0].ids.count(2) == 3


# ---- scores against sentence-transformers -----------------------------------------------------------
@pytest.mark.parametrize("name", ["bert-st6", "bert-st4", "bert-st3", "bert-hf", "xlmr-st6", "xlmr-spm"])
def test_predict_equals_cross_encoder_predict(folders, name):
    ce = CrossEncoder(reference_folder(name, folders), device="cpu")
    m = packformer.load(folders[name])
    assert type(m.activation_fn) is type(ce.activation_fn) is nn.Sigmoid
    got, want = m.predict(PAIRS), ce.predict(PAIRS)
    assert got.shape == want.shape == (len(PAIRS),) and got.dtype == np.float32
    close(got, want)
    raw = m.predict(PAIRS, activation_fn=nn.Identity())
    close(raw, ce.predict(PAIRS, activation_fn=nn.Identity()))
    assert np.ptp(raw) > 1e-2                                            # the scores really differ
    close(m.predict(PAIRS[3]), ce.predict(PAIRS[3]))                     # one pair: a scalar
    assert np.ndim(m.predict(PAIRS[3])) == 0


@pytest.mark.parametrize("fmt", ["st6", "st4", "st3"])
def test_a_folder_naming_identity_gives_raw_logits(root, bert_hf_dir, fmt):
    folder = save_as(bert_hf_dir, root / f"bert-{fmt}-identity", fmt, activation=IDENTITY)
    ce = CrossEncoder(str(folder), device="cpu")
    m = packformer.load(folder)
    assert type(m.activation_fn) is type(ce.activation_fn) is nn.Identity
    close(m.predict(PAIRS), ce.predict(PAIRS))
    assert (m.predict(PAIRS) < 0).any() or (m.predict(PAIRS) > 1).any()     # not squashed into (0, 1)


@pytest.mark.parametrize("name", ["bert-st6", "xlmr-st6"])
def test_rank_equals_cross_encoder_rank(folders, name):
    ce = CrossEncoder(reference_folder(name, folders), device="cpu")
    m = packformer.load(folders[name])
    for kw in ({}, {"top_k": 3}, {"return_documents": True}, {"top_k": 100, "return_documents": True},
               {"activation_fn": nn.Identity()}):
        got, want = m.rank(QUERIES[0], DOCUMENTS, **kw), ce.rank(QUERIES[0], DOCUMENTS, **kw)
        assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
        assert [set(r) for r in got] == [set(r) for r in want]
        assert [r.get("text") for r in got] == [r.get("text") for r in want]
        close([r["score"] for r in got], [r["score"] for r in want])
        assert all(isinstance(r["score"], float) for r in got)
    assert m.rank("q", []) == []


def test_multi_label_cross_encoder_predicts_every_label(root):
    folder = bert_cross_encoder(root / "nli-st6", num_labels=3)
    ce = CrossEncoder(str(folder), device="cpu")
    m = packformer.load(folder)
    assert type(m.activation_fn) is nn.Identity and m.num_labels == 3
    close(m.predict(PAIRS), ce.predict(PAIRS))
    close(m.predict(PAIRS, apply_softmax=True), ce.predict(PAIRS, apply_softmax=True))
    assert m.predict(PAIRS).shape == (len(PAIRS), 3)
    with pytest.raises(ValueError, match="one label"):
        m.rank("q", ["a"])


def test_real_minilm_encoder_matches_cross_encoder_within_1e_5(root, minilm_dir):
    """The real all-MiniLM-L6-v2 encoder under a one-label head (random): real activations, 1e-5."""
    from transformers import BertForSequenceClassification

    folder = root / "minilm-ce"
    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=1)
    hf.save_pretrained(folder)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, folder / f)
    ce = CrossEncoder(str(folder), device="cpu")
    m = packformer.load(folder)
    pairs = [("How many people live in Berlin?", "Berlin had a population of 3,520,031 in 2019."),
             ("How many people live in Berlin?", "Berlin is well known for its museums."),
             ("what is packing", "Packed batches concatenate every sequence; no padding. " * 40)]
    close(m.predict(pairs, activation_fn=nn.Identity()), ce.predict(pairs, activation_fn=nn.Identity()), 1e-5)
    close(m.predict(pairs), ce.predict(pairs), 1e-5)


# ---- batch independence -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert-st6", "xlmr-st6"])
def test_a_pair_score_never_depends_on_its_batch(folders, name):
    m = packformer.load(folders[name], max_batch_tokens=MAX_LENGTH)      # one long pair per batch at most
    batched = packformer.load(folders[name]).predict(PAIRS)
    alone = np.array([m.predict(p) for p in PAIRS])
    close(batched, alone, 1e-5)
    close(m.predict(PAIRS), alone, 1e-5)
    close(packformer.load(folders[name]).predict(PAIRS, batch_size=3), alone, 1e-5)
    reversed_ = packformer.load(folders[name]).predict(PAIRS[::-1])[::-1]
    close(reversed_, alone, 1e-5)


def test_reference_path_equals_fast_path(folders):
    fast = packformer.load(folders["bert-st6"]).predict(PAIRS)
    ref = packformer.load(folders["bert-st6"], fast=False).predict(PAIRS)
    close(fast, ref, 1e-5)


# ---- what loads as a cross-encoder ----------------------------------------------------------------------
def test_embedding_and_multi_label_classifier_folders_stay_plain_models(root, minilm_dir):
    from transformers import BertConfig, BertForSequenceClassification

    assert not is_cross_encoder_folder(minilm_dir)
    m = packformer.load(minilm_dir)
    assert type(m) is Model and model_kind(m) == "embedding"
    clf = root / "clf3"
    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=3)).save_pretrained(clf)
    assert not is_cross_encoder_folder(clf)
    c = packformer.load(clf)
    assert type(c) is Model and model_kind(c) == "classifier"


def test_a_cross_encoder_says_what_it_is(folders):
    m = packformer.load(folders["bert-st6"])
    assert model_kind(m) == "reranker"
    info = m.info()
    assert info["kind"] == "reranker" and info["activation"] == "Sigmoid" and info["num_labels"] == 1
    with pytest.raises(RuntimeError, match="cross-encoder .*predict\\(\\) / rank\\(\\)"):
        m.encode(["a"])
    assert m.classify(["kato"]).shape == (1, 1)          # the head on a single text still answers


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, msg", [
    ("text", "got str"), (5, "got int"), ([("a", "b"), ("a",)], r"pairs\[1\] must be a \(str, str\) pair, got a tuple of 1"),
    ([("a", 3)], r"pairs\[0\]"), ([["a", "b", "c"]], r"pairs\[0\].*list of 3"), ([None], r"pairs\[0\].*NoneType")])
def test_bad_pairs_are_named(folders, bad, msg):
    m = packformer.load(folders["bert-st6"])
    with pytest.raises(TypeError, match=msg):
        m.predict(bad)


def test_a_lone_surrogate_in_a_pair_a_query_or_a_document_is_named(folders):
    m = packformer.load(folders["bert-st6"])
    with pytest.raises(ValueError, match=r"pairs\[1\]\[1\] holds .* at position 1: a lone surrogate"):
        m.predict([("q", "a"), ("q", "d\ud800")])
    with pytest.raises(ValueError, match=r"pair\[0\] holds"):
        m.predict(("\udc00", "d"))
    with pytest.raises(ValueError, match=r"query holds"):
        m.rank("q\ud800", ["a"])
    with pytest.raises(ValueError, match=r"documents\[1\] holds"):
        m.rank("q", ["a", "\ud800"])


def test_bad_rank_arguments_are_named(folders):
    m = packformer.load(folders["bert-st6"])
    with pytest.raises(TypeError, match="query must be a str"):
        m.rank(["q"], ["a"])
    with pytest.raises(TypeError, match="documents must be a list of str"):
        m.rank("q", "a")
    with pytest.raises(TypeError, match=r"documents\[1\] is int"):
        m.rank("q", ["a", 1])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            m.rank("q", ["a"], top_k=k)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        m.predict([("a", "b")], batch_size=0)


def test_over_long_pair_without_truncation_is_refused_naming_it(folders):
    m = packformer.load(folders["bert-st6"])
    with pytest.raises(ValueError, match=rf"pairs\[1\] has \d+ tokens, more than the model's maximum of {MAX_LENGTH}"):
        m.predict([("a", "b"), ("a", "word " * 100)], truncate=False)
    assert m.predict([("a", "b")], truncate=False).shape == (1,)


def test_check_pairs_and_pair_seq():
    assert check_pairs(("a", "b")) == ([("a", "b")], True)
    assert check_pairs([["a", "b"], ("c", "d")]) == ([("a", "b"), ("c", "d")], False)
    assert check_pairs([]) == ([], False)
    assert len(PairSeq([1, 2, 3], None)) == 3


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bert-st6", "xlmr-st6"])
def test_gpu_fp16_scores_match_cpu_fp32(folders, name):
    cpu = packformer.load(folders[name]).predict(PAIRS, activation_fn=nn.Identity())
    gpu = packformer.load(folders[name], device="cuda")
    got = gpu.predict(PAIRS, activation_fn=nn.Identity())
    close(got, cpu, 2e-2)
    for _ in range(3):                      # replays (CUDA graphs) give the same scores
        close(gpu.predict(PAIRS, activation_fn=nn.Identity()), got, 1e-3)
    assert [r["corpus_id"] for r in gpu.rank(QUERIES[0], DOCUMENTS)][:1] == \
        [r["corpus_id"] for r in packformer.load(folders[name]).rank(QUERIES[0], DOCUMENTS)][:1]
