"""Qwen3-Reranker-style scoring: P("yes") of the last token from two LM-head rows, against transformers'
Qwen3ForCausalLM run on the model card's recipe (full logits, left padding), tied and untied heads."""
import numpy as np
import pytest
import torch

from packformer.decoder_rerank import PREFIX, SUFFIX, DecoderReranker, format_pair

transformers = pytest.importorskip("transformers")
from tests.families.test_qwen3 import bpe_tokenizer, random_qwen3  # noqa: E402

QUERY = "What is the capital of China?"
DOCS = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
        "yes", "Explain gravity " * 60]


@pytest.fixture(scope="module", params=["tied", "untied"])
def reranker_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"qwen3-reranker-{request.param}")
    lm = random_qwen3(transformers.Qwen3ForCausalLM, seed=7, tie_word_embeddings=request.param == "tied",
                      max_position_embeddings=512)
    lm.save_pretrained(folder)
    bpe_tokenizer(folder, eos=False)
    return folder, lm


def card_scores(lm, folder, pairs, max_length):
    """The model card's compute_logits: full LM logits of the last token, log_softmax over (no, yes)."""
    tok = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    pre, suf = tok.encode(PREFIX, add_special_tokens=False), tok.encode(SUFFIX, add_special_tokens=False)
    body = tok([format_pair(q, d) for q, d in pairs], padding=False, truncation="longest_first",
               return_attention_mask=False, max_length=max_length - len(pre) - len(suf))
    body["input_ids"] = [pre + ids + suf for ids in body["input_ids"]]
    inputs = tok.pad(body, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm(**inputs).logits[:, -1, :]
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    return torch.log_softmax(torch.stack([logits[:, no], logits[:, yes]], 1), 1)[:, 1].exp().numpy()


@pytest.mark.parametrize("fast", [False, True])
def test_scores_equal_the_model_cards_yes_no_probability(reranker_folder, fast):
    folder, lm = reranker_folder
    rr = DecoderReranker.from_folder(folder, fast=fast, max_length=260)
    pairs = [(QUERY, d) for d in DOCS]
    got = rr.predict(pairs)
    ref = card_scores(lm, folder, pairs, 260)
    assert np.abs(got - ref).max() <= 1e-4
    assert max(len(x) for x in rr.token_ids(pairs)) == 260        # the long document was cut to fit


def test_only_two_rows_are_kept_and_tied_rows_come_from_the_embeddings(reranker_folder):
    folder, lm = reranker_folder
    rr = DecoderReranker.from_folder(folder)
    assert rr.rows.shape == (2, lm.config.hidden_size)
    tok = rr.model.tokenizer.tok
    ids = [tok.token_to_id("no"), tok.token_to_id("yes")]
    assert torch.equal(rr.rows, lm.lm_head.weight[ids].float())


def test_rank_sorts_and_a_score_does_not_depend_on_its_batch(reranker_folder):
    folder, _ = reranker_folder
    rr = DecoderReranker.from_folder(folder)
    batched = rr.predict([(QUERY, d) for d in DOCS])
    alone = np.array([rr.predict([(QUERY, d)])[0] for d in DOCS])
    assert np.array_equal(alone, batched)
    ranked = rr.rank(QUERY, DOCS, top_k=3, return_documents=True)
    assert [r["score"] for r in ranked] == sorted(batched.tolist(), reverse=True)[:3]
    assert ranked[0]["text"] == DOCS[ranked[0]["corpus_id"]]


def test_bad_pairs_and_non_rerankers_are_refused(reranker_folder, tmp_path):
    folder, _ = reranker_folder
    rr = DecoderReranker.from_folder(folder)
    with pytest.raises(TypeError, match="pairs"):
        rr.predict([QUERY])
    with pytest.raises(ValueError, match="no room"):
        DecoderReranker.from_folder(folder, max_length=100)
