"""The official clients against a real `packformer serve` process of a sentence-transformers folder with
prompts (include_prompt=False, so prompted requests batch with their prompt left out of pooling):
huggingface_hub's InferenceClient.feature_extraction (it posts to TEI's `POST /`), the OpenAI client's
embeddings with `dimensions` and a `prompt_name`, all compared with the same folder's encode(); TEI's
`POST /` on a classifier; and the bad-input matrix of the new fields."""
from __future__ import annotations

import shutil

import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

import packformer
from packformer.bench.launch import ServerProcess
from packformer.loading import builtin_model_dir
from packformer.server.formats import shorten
from tests.prompt_folders import st_folder

PROMPTS = {"query": "query: ", "instruct": "Represent this sentence for searching: "}
TEXTS = ["The quick brown fox.", "packed batches never pad", "a", "Hello, world! How are you?"]
LONG = "river " * 300


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return st_folder(tmp_path_factory.mktemp("clients") / "m", PROMPTS, include_prompt=False)


@pytest.fixture(scope="module")
def model(folder):
    return packformer.load(folder)


@pytest.fixture(scope="module")
def server(folder):
    with ServerProcess([str(folder), "--model-name", "minilm-prompts", "--log-level", "warning"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf(server):
    return InferenceClient(base_url=server.url, timeout=60)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=tol, rtol=0)


# ---- huggingface_hub: feature_extraction posts to / -----------------------------------------------
def test_feature_extraction_of_one_text_equals_encode(hf, model):
    got = hf.feature_extraction("hello")
    assert got.dtype == np.float32 and got.shape == (1, 384)
    close(got, model.encode(["hello"]))


def test_feature_extraction_with_a_prompt_name_leaves_it_out_of_pooling_as_encode(hf, model):
    got = hf.feature_extraction(TEXTS, prompt_name="instruct")
    close(got, model.encode(TEXTS, prompt_name="instruct"))
    assert np.abs(got - model.encode(TEXTS)).max() > 1e-3              # the prompt changed the embedding


@pytest.mark.parametrize("normalize", [True, False])
def test_feature_extraction_dimensions_cut_then_normalize_as_tei(hf, model, normalize):
    got = hf.feature_extraction(TEXTS, dimensions=64, normalize=normalize)
    full = model.encode(TEXTS, normalize_embeddings=normalize)
    close(got, shorten(full, 64) if normalize else full[:, :64])


def test_feature_extraction_truncates_when_asked(hf, model):
    close(hf.feature_extraction([LONG, "a"], truncate=True, prompt_name="query"),
          model.encode([LONG, "a"], prompt_name="query"))


def test_feature_extraction_unknown_prompt_name_is_a_422(hf):
    with pytest.raises(HfHubHTTPError) as e:
        hf.feature_extraction("x", prompt_name="nope")
    assert e.value.response.status_code == 422
    assert "unknown prompt_name 'nope'" in e.value.response.json()["error"]


def test_invocations_is_the_same_route(http, model):
    r = http.post("/invocations", json={"inputs": TEXTS[:2], "prompt_name": "query"})
    assert r.status_code == 200, r.text
    close(r.json(), model.encode(TEXTS[:2], prompt_name="query"))


# ---- OpenAI ---------------------------------------------------------------------------------------
def test_openai_embeddings_with_dimensions_and_a_prompt_name(oai, model):
    r = oai.embeddings.create(input=TEXTS, model="minilm-prompts", dimensions=100, encoding_format="float",
                              extra_body={"prompt_name": "instruct"})
    got = np.array([d.embedding for d in r.data])
    close(got, shorten(model.encode(TEXTS, prompt_name="instruct"), 100))
    close(np.linalg.norm(got, axis=1), np.ones(len(TEXTS)))
    assert r.usage.prompt_tokens == sum(map(len, model.token_ids(TEXTS, prompt_name="instruct")))


def test_openai_embeddings_base64_with_dimensions(oai, model):
    r = oai.embeddings.create(input=TEXTS[:2], model="m", dimensions=32)        # the client asks base64
    close([d.embedding for d in r.data], shorten(model.encode(TEXTS[:2]), 32))


def test_openai_models_list_names_the_model(oai):
    assert [m.id for m in oai.models.list()] == ["minilm-prompts"]


# ---- TEI /embed -----------------------------------------------------------------------------------
def test_embed_prompt_name_and_dimensions(http, model):
    r = http.post("/embed", json={"inputs": TEXTS, "prompt_name": "query", "dimensions": 48})
    assert r.status_code == 200, r.text
    close(r.json(), shorten(model.encode(TEXTS, prompt_name="query"), 48))


def test_info_lists_the_prompts(http):
    info = http.get("/info").json()
    assert info["prompts"] == PROMPTS and info["default_prompt_name"] is None


# ---- POST / on a classifier -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_server(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-classifier")
    labels = {0: "negative", 1: "positive"}
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(builtin_model_dir() / name, d / name)
    with ServerProcess([str(d), "--log-level", "warning"]) as srv:
        yield srv, packformer.load(d)


def test_post_root_on_a_classifier_is_predict(classifier_server):
    srv, clf = classifier_server
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        root = c.post("/", json={"inputs": TEXTS[:2], "raw_scores": True})
        assert root.status_code == 200, root.text
        assert root.json() == c.post("/predict", json={"inputs": TEXTS[:2], "raw_scores": True}).json()
        logits = clf.classify(TEXTS[:2])
        for row, lg in zip(root.json(), logits):
            assert {p["label"]: p["score"] for p in row} == pytest.approx(
                {"negative": float(lg[0]), "positive": float(lg[1])}, abs=1e-5)
        bad = c.post("/", json={"inputs": "a", "raw_scores": "yes"})
        assert bad.status_code == 422 and "raw_scores" in bad.json()["error"]


# ---- bad input ------------------------------------------------------------------------------------
BAD = [
    ("/embed", {"inputs": "a", "prompt_name": "nope"}, "unknown prompt_name 'nope'; the model's prompts are: 'query', 'instruct'"),
    ("/", {"inputs": "a", "prompt_name": "nope"}, "unknown prompt_name 'nope'"),
    ("/v1/embeddings", {"input": "a", "prompt_name": "nope"}, "unknown prompt_name 'nope'"),
    ("/embed", {"inputs": "a", "prompt_name": 3}, "prompt_name: Input should be a valid string"),
    ("/v1/embeddings", {"input": [[1000, 1001]], "prompt_name": "query"}, "`prompt_name` applies to text inputs"),
    ("/embed", {"inputs": "a", "dimensions": 0}, "dimensions: Input should be greater than or equal to 1"),
    ("/embed", {"inputs": "a", "dimensions": 385}, "dimensions must be at most the model's 384, got 385"),
    ("/embed", {"inputs": "a", "dimensions": "8"}, "dimensions: Input should be a valid integer"),
    ("/", {"inputs": "a", "dimensions": 385}, "dimensions must be at most the model's 384"),
    ("/", {"inputs": "a", "dimensions": 0}, "dimensions: Input should be greater than or equal to 1"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, "dimensions: Input should be greater than or equal to 1"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, "dimensions must be at most the model's 384"),
    ("/", {}, "inputs: Field required"),
    ("/", {"inputs": 5}, "inputs.str: Input should be a valid string"),
    ("/", {"inputs": []}, "`inputs` is empty"),
    ("/", b"{not json", "not valid JSON"),
]


@pytest.mark.parametrize("route,body,fragment", BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_bad_new_fields_get_a_422_naming_them(http, route, body, fragment):
    r = (http.post(route, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
         else http.post(route, json=body))
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and fragment in r.json()["error"], r.json()["error"]
