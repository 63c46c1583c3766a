"""Qwen3-Reranker-style scoring: P("yes") of the last token from two LM-head rows, against transformers'
Qwen3ForCausalLM run on the model card's recipe (full logits, left padding), tied and untied heads.

packformer.load() of such a folder gives a DecoderReranker with the cross-encoder API: predict / rank / raw
logits (yes - no) / instructions, alone == batched, and a real `packformer serve` answering /rerank, POST /
and the official Cohere client with predict()'s scores."""
import json

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import packformer
from packformer.decoder_rerank import (DEFAULT_INSTRUCTION, PREFIX, SUFFIX, DecoderReranker,
                                       is_decoder_reranker_folder, format_pair)
from packformer.engine import Model
from packformer.rerank import CrossEncoderModel, model_kind

transformers = pytest.importorskip("transformers")
from tests.families.test_qwen3 import bpe_tokenizer, random_qwen3  # noqa: E402

QUERY = "What is the capital of China?"
DOCS = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
        "yes", "Explain gravity " * 60]
INSTRUCTION = "Given a question, find the sentence that answers it"


def reranker_dir(folder, tied: bool, seed: int = 7):
    lm = random_qwen3(transformers.Qwen3ForCausalLM, seed=seed, tie_word_embeddings=tied, max_position_embeddings=512)
    with torch.no_grad():          # logits of a few units, not ~0.05: scores spread over (0, 1), not all ~0.5
        lm.model.norm.weight.mul_(40.0)
    lm.save_pretrained(folder)
    bpe_tokenizer(folder, eos=False)
    return folder, lm


@pytest.fixture(scope="module", params=["tied", "untied"])
def reranker_folder(request, tmp_path_factory):
    return reranker_dir(tmp_path_factory.mktemp(f"qwen3-reranker-{request.param}"), request.param == "tied")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return reranker_dir(tmp_path_factory.mktemp("qwen3-reranker-serve"), tied=False, seed=11)


def card_logits(lm, folder, pairs, max_length, instruction=None):
    """The model card's compute_logits: the last token's full LM logits -> (logit yes - logit no, P(yes) from
    log_softmax over (no, yes))."""
    tok = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    pre, suf = tok.encode(PREFIX, add_special_tokens=False), tok.encode(SUFFIX, add_special_tokens=False)
    body = tok([format_pair(q, d, instruction) for q, d in pairs], padding=False, truncation="longest_first",
               return_attention_mask=False, max_length=max_length - len(pre) - len(suf))
    body["input_ids"] = [pre + ids + suf for ids in body["input_ids"]]
    inputs = tok.pad(body, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm(**inputs).logits[:, -1, :]
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    pair = torch.stack([logits[:, no], logits[:, yes]], 1)
    return (pair[:, 1] - pair[:, 0]).numpy(), torch.log_softmax(pair, 1)[:, 1].exp().numpy()


def close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=0)


# ---- loading ----------------------------------------------------------------------------------------------
def test_load_picks_the_reranker_for_a_qwen3_causal_lm_folder_with_yes_no_tokens(reranker_folder):
    folder, _ = reranker_folder
    assert is_decoder_reranker_folder(folder)
    rr = packformer.load(folder)
    assert isinstance(rr, DecoderReranker) and isinstance(rr, CrossEncoderModel)
    assert model_kind(rr) == "reranker" and rr.num_labels == 1 and rr.format == "decoder-reranker"
    assert type(rr.activation_fn) is nn.Sigmoid and rr.max_seq_length == 512       # 8192 capped at positions
    emb = packformer.load(folder, kind="embedding")                                # the override: the body embeds
    assert type(emb) is Model and model_kind(emb) == "embedding" and emb.encode(["a b"]).shape == (1, 64)


def test_folders_that_are_not_decoder_rerankers_stay_what_they_are(tmp_path, reranker_folder):
    folder, lm = reranker_folder
    no_tok = tmp_path / "no-tokenizer"                          # the same weights, no tokenizer.json: an embedder
    lm.save_pretrained(no_tok)
    assert not is_decoder_reranker_folder(no_tok)
    base = tmp_path / "base-model"                              # Qwen3Model (not *ForCausalLM)
    lm.model.save_pretrained(base)
    bpe_tokenizer(base, eos=False)
    assert not is_decoder_reranker_folder(base)
    assert type(packformer.load(base)) is Model
    assert isinstance(packformer.load(base, kind="reranker"), DecoderReranker)   # said explicitly: it reranks


def test_unknown_kind_and_misplaced_options_are_clear_errors(reranker_folder):
    folder, _ = reranker_folder
    with pytest.raises(ValueError, match="unknown kind 'cross-encoder'.*'embedding', 'reranker'"):
        packformer.load(folder, kind="cross-encoder")
    with pytest.raises(ValueError, match="decoder reranker needs a qwen3 model.*'bert'"):
        packformer.load(packformer.loading.builtin_model_dir(), kind="reranker")
    with pytest.raises(ValueError, match="takes no instruction"):
        packformer.load(None, instruction="x")
    with pytest.raises(ValueError, match="no room"):
        packformer.load(folder, max_length=100)
    from packformer.loading import random_parts
    encoder_ce = CrossEncoderModel(random_parts("minilm-l6", num_labels=1))
    with pytest.raises(ValueError, match="takes no instruction: it is an encoder cross-encoder"):
        encoder_ce.predict([("a", "b")], instruction="x")


# ---- scores against the model card -------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
def test_scores_and_raw_logits_equal_the_model_cards_yes_no_recipe(reranker_folder, fast):
    folder, lm = reranker_folder
    rr = packformer.load(folder, fast=fast, max_length=400)
    pairs = [(QUERY, d) for d in DOCS]
    ref_logit, ref_p = card_logits(lm, folder, pairs, 400)
    close(rr.predict(pairs), ref_p)
    close(rr.predict(pairs, activation_fn=nn.Identity()), ref_logit)          # raw score: logit yes - logit no
    lengths = [len(s) for s in rr.pair_ids(pairs)]
    assert lengths[3] == 400 and max(lengths[:3]) < 400                      # the long document was cut to fit


def test_from_folder_is_load_with_kind_reranker(reranker_folder):
    folder, lm = reranker_folder
    rr = DecoderReranker.from_folder(folder, max_length=400)
    _, ref_p = card_logits(lm, folder, [(QUERY, DOCS[0])], 400)
    assert isinstance(rr, DecoderReranker) and rr.max_length == 400
    close(rr.predict((QUERY, DOCS[0])), ref_p[0])                             # one pair: a scalar


def test_instruction_at_load_and_per_call_equals_the_card_with_it(reranker_folder):
    folder, lm = reranker_folder
    pairs = [(QUERY, d) for d in DOCS[:3]]
    _, ref = card_logits(lm, folder, pairs, 512, INSTRUCTION)
    _, ref_default = card_logits(lm, folder, pairs, 512)
    rr = packformer.load(folder)
    close(rr.predict(pairs, instruction=INSTRUCTION), ref)
    close(rr.predict(pairs), ref_default)
    with_default = packformer.load(folder, instruction=INSTRUCTION)
    close(with_default.predict(pairs), ref)
    close(with_default.predict(pairs, instruction=DEFAULT_INSTRUCTION), ref_default)   # per call wins
    assert [r["corpus_id"] for r in rr.rank(QUERY, DOCS[:3], instruction=INSTRUCTION)] == \
        list(np.argsort(-ref, kind="stable"))
    assert not np.allclose(ref, ref_default)                                  # the instruction is seen
    with pytest.raises(TypeError, match="instruction must be a str"):
        rr.predict(pairs, instruction=3)


def test_only_two_rows_are_kept_and_tied_rows_come_from_the_embeddings(reranker_folder):
    folder, lm = reranker_folder
    rr = packformer.load(folder)
    assert rr.rows.shape == (2, lm.config.hidden_size)
    tok = rr.tokenizer.tok
    ids = [tok.token_to_id("no"), tok.token_to_id("yes")]
    assert torch.equal(rr.rows, lm.lm_head.weight[ids].float())


def test_rank_sorts_and_a_score_does_not_depend_on_its_batch(reranker_folder):
    folder, _ = reranker_folder
    rr = packformer.load(folder)
    batched = rr.predict([(QUERY, d) for d in DOCS])
    alone = np.array([rr.predict([(QUERY, d)])[0] for d in DOCS])
    assert np.array_equal(alone, batched)
    assert np.array_equal(rr.predict([(QUERY, d) for d in DOCS], batch_size=1), batched)
    ranked = rr.rank(QUERY, DOCS, top_k=3, return_documents=True)
    assert [r["score"] for r in ranked] == sorted(batched.tolist(), reverse=True)[:3]
    assert ranked[0]["text"] == DOCS[ranked[0]["corpus_id"]]


def test_bad_pairs_and_over_long_pairs_are_refused(reranker_folder):
    folder, _ = reranker_folder
    rr = packformer.load(folder, max_length=400)
    with pytest.raises(TypeError, match="pairs"):
        rr.predict([QUERY])
    with pytest.raises(ValueError, match=r"pairs\[3\] has \d+ tokens with the reranker's prompt, more than the "
                                         r"model's maximum of 400"):
        rr.predict([(QUERY, d) for d in DOCS], truncate=False)
    with pytest.raises(RuntimeError, match="does not embed texts"):
        rr.encode(["a"])


def test_info_reports_parameters_and_weight_memory(untied, capsys):
    from packformer.cli import main

    folder, lm = untied
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = lm.config                    # the checkpoint's body (no LM head) + the zero biases packformer's Linears keep
    zero_biases = c.num_hidden_layers * ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                                         + c.hidden_size + 2 * c.intermediate_size + c.hidden_size)
    params = sum(p.numel() for p in lm.model.parameters()) + zero_biases
    assert info["parameters"] == params and info["family"] == "qwen3" and info["num_labels"] == 1
    rows = 4 * 2 * c.hidden_size                                              # the two LM-head rows, fp32
    assert info["memory_bytes"] == 4 * params + rows
    assert packformer.load(folder, dtype="bfloat16").info()["memory_bytes"] == 2 * params + rows
    assert main(["info", str(folder)]) == 0
    assert "memory_bytes" in capsys.readouterr().out


# ---- the server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(untied):
    from packformer.bench.launch import ServerProcess

    with ServerProcess([str(untied[0]), "--max-batch-tokens", "1024", "--log-level", "warning"]) as srv:
        yield srv


def test_server_rerank_routes_and_the_cohere_client_equal_predict(untied, server):
    cohere = pytest.importorskip("cohere")
    folder, lm = untied
    rr = packformer.load(folder)
    pairs = [(QUERY, d) for d in DOCS]
    scores, logits = rr.predict(pairs), rr.predict(pairs, activation_fn=nn.Identity())
    close(scores, card_logits(lm, folder, pairs, 512)[1])
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/info").json()["model_type"] == "reranker"
        tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "truncate": True, "return_text": True}).json()
        assert [r["index"] for r in tei] == list(np.argsort(-scores, kind="stable"))
        close([r["score"] for r in tei], scores[[r["index"] for r in tei]], atol=1e-5)
        assert [r["text"] for r in tei] == [DOCS[r["index"]] for r in tei]
        raw = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "truncate": True, "raw_scores": True}).json()
        close([r["score"] for r in raw], logits[[r["index"] for r in raw]], atol=1e-5)
        root = http.post("/", json={"query": QUERY, "texts": DOCS, "truncate": True}).json()   # TEI's dispatch
        assert [r["index"] for r in root] == [r["index"] for r in tei]
        assert http.post("/embed", json={"inputs": "a"}).status_code == 422
    client = cohere.ClientV2(base_url=server.url, api_key="x", timeout=60)
    got = client.rerank(model="qwen3-reranker", query=QUERY, documents=DOCS, top_n=3)
    want = rr.rank(QUERY, DOCS, top_k=3)
    assert [r.index for r in got.results] == [w["corpus_id"] for w in want]
    close([r.relevance_score for r in got.results], [w["score"] for w in want], atol=1e-5)
    assert got.meta.tokens.input_tokens == sum(map(len, rr.pair_ids(pairs)))


def test_rerank_command_ranks_with_the_reranker(untied, capsys):
    from packformer.cli import main

    folder, _ = untied
    assert main(["rerank", "--model", str(folder), "--query", QUERY, *DOCS[:3], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = packformer.load(folder).rank(QUERY, DOCS[:3], return_documents=True)
    assert [g["corpus_id"] for g in got] == [w["corpus_id"] for w in want]
    close([g["score"] for g in got], [w["score"] for w in want], atol=1e-6)
    assert main(["rerank", "--model", str(folder), "--query", QUERY, *DOCS[:3], "--json", "--raw-scores",
                 "--instruction", INSTRUCTION]) == 0
    got = json.loads(capsys.readouterr().out)
    want = packformer.load(folder).predict([(QUERY, d) for d in DOCS[:3]], activation_fn=nn.Identity(),
                                           instruction=INSTRUCTION)
    close([g["score"] for g in got], want[[g["corpus_id"] for g in got]], atol=1e-6)


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_loads_bf16_by_default_and_stays_close_to_the_fp32_cpu_scores(untied):
    folder, _ = untied
    pairs = [(QUERY, d) for d in DOCS] + [(d, QUERY) for d in DOCS]
    want = packformer.load(folder, device="cpu").predict(pairs)
    gpu = packformer.load(folder, device="cuda")
    assert gpu.dtype == torch.bfloat16 and isinstance(gpu, DecoderReranker)
    got = gpu.predict(pairs)
    assert np.abs(got - want).max() <= 2e-2, np.abs(got - want).max()
    alone = np.array([gpu.predict([p])[0] for p in pairs])
    assert np.array_equal(alone, got)
