"""The HTTP API of `packformer serve`, against real servers in subprocesses (one per fixture, per module):
OpenAI client parity (float, base64, dimensions, token ids), TEI /embed, 200 concurrent mixed requests,
the bad-input matrix, the API key, /predict on a classifier, /tokenize, /info, /health."""
from __future__ import annotations

import asyncio
import base64
import re
import shutil

import httpx
import numpy as np
import openai
import pytest

import packformer
from packformer.bench.launch import ServerProcess
from packformer.bench.workloads import generate_texts
from packformer.loading import builtin_model_dir
from packformer.server.formats import shorten

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CLIENT_BATCH = 8
PAYLOAD_LIMIT = 100_000
TEXTS = ["The quick brown fox.", "packed batches never pad", "a", "river " * 300, "Hello, world! How are you?"]


@pytest.fixture(scope="module")
def server():
    args = ["--max-batch-tokens", "4096", "--api-key", KEY, "--max-client-batch-size", str(MAX_CLIENT_BATCH),
            "--payload-limit", str(PAYLOAD_LIMIT), "--log-level", "warning"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification with id2label, plus the built-in model's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-classifier")
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(builtin_model_dir() / name, d / name)
    return d


@pytest.fixture(scope="module")
def classifier_server(classifier_dir):
    with ServerProcess([str(classifier_dir), "--max-batch-tokens", "2048", "--log-level", "warning"]) as srv:
        yield srv


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), atol=1e-5, rtol=0)


# ---- OpenAI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_openai_client_returns_model_encode_in_order(server, minilm, encoding_format):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    texts = TEXTS[:3] + TEXTS[4:]                         # the 300-word text needs --auto-truncate
    kw = {} if encoding_format is None else {"encoding_format": encoding_format}   # None: the client asks base64
    r = client.embeddings.create(input=texts, model="all-MiniLM-L6-v2", **kw)
    assert [d.index for d in r.data] == list(range(len(texts)))
    if encoding_format == "base64":          # asked for explicitly, the client hands back the string
        got = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data]
    else:                                    # float, or base64 that the client decoded itself
        got = [d.embedding for d in r.data]
    close(got, minilm.encode(texts))
    assert r.model == "all-MiniLM-L6-v2"
    n_tokens = sum(map(len, minilm.token_ids(texts)))
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens


def test_openai_base64_is_little_endian_float32(http, minilm):
    r = http.post("/v1/embeddings", json={"input": "hello", "model": "m", "encoding_format": "base64"}).json()
    close(np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4"), minilm.encode(["hello"])[0])


def test_openai_route_without_v1_prefix_and_dimensions(server, minilm):
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    r = client.embeddings.create(input=TEXTS[:2], model="m", dimensions=64, encoding_format="float")
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, 64)
    close(got, shorten(minilm.encode(TEXTS[:2]), 64))
    close(np.linalg.norm(got, axis=1), [1.0, 1.0])


def test_openai_token_id_input_equals_the_text(server, minilm):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    ids = [seq[1:-1] for seq in minilm.token_ids(TEXTS[:2])]          # without [CLS] / [SEP], like tiktoken
    many = client.embeddings.create(input=ids, model="m", encoding_format="float")
    one = client.embeddings.create(input=ids[0], model="m", encoding_format="float")
    close([d.embedding for d in many.data], minilm.encode(TEXTS[:2]))
    close(one.data[0].embedding, minilm.encode(TEXTS[0]))


# ---- TEI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_embed_equals_model_encode(http, minilm, normalize):
    r = http.post("/embed", json={"inputs": TEXTS[:3], "normalize": normalize})
    assert r.status_code == 200
    close(r.json(), minilm.encode(TEXTS[:3], normalize_embeddings=normalize))
    single = http.post("/embed", json={"inputs": "a"}).json()
    assert len(single) == 1
    close(single[0], minilm.encode("a"))


def test_embed_truncates_when_asked(http, minilm):
    r = http.post("/embed", json={"inputs": [TEXTS[3]], "truncate": True})
    assert r.status_code == 200
    close(r.json(), minilm.encode([TEXTS[3]], truncate=True))


def test_tokenize_gives_ids_and_offsets(http, minilm):
    (toks,) = http.post("/tokenize", json={"inputs": "Hello there"}).json()
    assert [t["id"] for t in toks] == minilm.token_ids(["Hello there"])[0]
    assert toks[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert toks[1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    (plain,) = http.post("/tokenize", json={"inputs": ["Hello there"], "add_special_tokens": False}).json()
    assert [t["id"] for t in plain] == minilm.token_ids(["Hello there"])[0][1:-1]


def test_info_and_health(http, minilm):
    info = http.get("/info").json()
    assert info["model_id"] == "all-MiniLM-L6-v2" and info["model_type"] == "embedding"
    assert info["dim"] == 384 and info["max_input_length"] == minilm.max_seq_length == 256
    assert info["max_batch_tokens"] == 4096 and info["max_client_batch_size"] == MAX_CLIENT_BATCH
    assert info["max_concurrent_requests"] == 512 and info["version"] == packformer.__version__
    assert info["state"] == "ready" and info["family"] == "bert" and info["architecture"]["norm"] == "post"
    assert info["gemm_dtype"] == info["model_dtype"] == "float32" and info["fp8_accuracy"] is None
    assert httpx.get(str(http.base_url) + "/health", timeout=60).json() == {"status": "ok"}   # open, no key


# ---- concurrency --------------------------------------------------------------------------------
def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_200_concurrent_mixed_requests_equal_single_requests(server, http, minilm):
    texts = generate_texts(600, seed=11)
    g = np.random.default_rng(3)
    requests, i = [], 0
    for k in range(200):                                          # 1..3 texts each
        n = int(g.integers(1, 4))
        assert i + n <= len(texts)
        requests.append(texts[i: i + n])
        i += n
    single = []
    for r in requests:                                            # one at a time
        resp = http.post("/embed", json={"inputs": r})
        assert resp.status_code == 200, resp.text
        single.append(resp.json())
    before = http.get("/metrics").text

    async def burst():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as ac:
            async def one(k):
                async with sem:
                    r = await ac.post("/embed", json={"inputs": requests[k]})
                    return k, r.status_code, r.json()
            return await asyncio.gather(*(one(k) for k in range(len(requests))))

    results = asyncio.run(asyncio.wait_for(burst(), 300))
    after = http.get("/metrics").text
    assert sorted(k for k, _, _ in results) == list(range(200))
    for k, status, body in results:
        assert status == 200, body
        assert len(body) == len(requests[k])
        close(body, single[k])
    flat = [t for r in requests for t in r]
    close([row for _, _, body in results for row in body], minilm.encode(flat))
    # the model ran every input exactly once: no request lost or run twice
    tokens = sum(len(s) for s in minilm.token_ids(flat))
    assert _metric(after, "packformer_tokens_total") - _metric(before, "packformer_tokens_total") == tokens
    served = 'packformer_requests_total{route="/embed",status="200"}'
    assert _metric(after, served) - _metric(before, served) == 200
    # and they really were batched together
    assert _metric(after, "packformer_batch_size_count") - _metric(before, "packformer_batch_size_count") < 200


# ---- errors -------------------------------------------------------------------------------------
LONG = "word " * 300
TOO_MANY = ["x"] * (MAX_CLIENT_BATCH + 1)
BAD_INPUTS = [
    # route, body (dict = JSON, bytes = raw), status, fragment of the error message
    ("/embed", {}, 422, "inputs: Field required"),
    ("/embed", {"inputs": []}, 422, "`inputs` is empty"),
    ("/embed", {"inputs": ""}, 422, "`inputs[0]` is empty"),
    ("/embed", {"inputs": ["a", ""]}, 422, "`inputs[1]` is empty"),
    ("/embed", {"inputs": 5}, 422, "inputs.str: Input should be a valid string"),
    ("/embed", {"inputs": ["a", 5]}, 422, "inputs.list[str].1: Input should be a valid string"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "normalize: Input should be a valid boolean"),
    ("/embed", {"inputs": "a", "truncation_direction": "Left"}, 422, "truncation_direction"),
    ("/embed", b"{not json", 422, "not valid JSON"),
    ("/embed", b"[1, 2]", 422, "valid dictionary"),
    ("/embed", {"inputs": TOO_MANY}, 422, f"has {MAX_CLIENT_BATCH + 1} inputs, more than the maximum of 8"),
    ("/embed", {"inputs": ["ok", LONG]}, 413, "texts[1] has 302 tokens, more than the model's maximum of 256"),
    ("/embed", {"inputs": "x" * (PAYLOAD_LIMIT + 10)}, 413, f"limit is {PAYLOAD_LIMIT} bytes"),
    ("/v1/embeddings", {"model": "m"}, 422, "input: Field required"),
    ("/v1/embeddings", {"input": [], "model": "m"}, 422, "`input` is empty"),
    ("/v1/embeddings", {"input": [[]], "model": "m"}, 422, "`input[0]` is empty"),
    ("/v1/embeddings", {"input": [[1, "a"]], "model": "m"}, 422, "Input should be a valid integer"),
    ("/v1/embeddings", {"input": [True], "model": "m"}, 422, "Input should be a valid"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 422, "dimensions: Input should be greater than or equal to 1"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, 422, "dimensions must be at most the model's 384"),
    ("/v1/embeddings", {"input": [[5, 30522]]}, 422, "input[0] has token ids outside the vocabulary [0, 30522)"),
    ("/v1/embeddings", {"input": [1000] * 300}, 413, "input[0] has 302 tokens"),
    ("/v1/embeddings", {"input": LONG}, 413, "--auto-truncate"),
    ("/v1/embeddings", {"input": TOO_MANY}, 422, "more than the maximum of 8"),
    ("/embeddings", {"input": []}, 422, "`input` is empty"),
    ("/predict", {"inputs": "a"}, 422, "has no classification head"),
    ("/predict", {"inputs": []}, 422, "`inputs` is empty"),
    ("/tokenize", {"inputs": []}, 422, "`inputs` is empty"),
    ("/tokenize", {"inputs": 3}, 422, "Input should be a valid string"),
    # JSON may escape a lone surrogate, which is no character: UTF-8 (and so the tokenizer) cannot take it
    ("/embed", b'{"inputs": ["ok", "bad \\ud800 here"]}', 422, "`inputs[1]` holds '\\ud800' at position 4: a lone surrogate"),
    ("/v1/embeddings", b'{"input": "x\\udfff"}', 422, "`input[0]` holds '\\udfff' at position 1"),
    ("/tokenize", b'{"inputs": ["\\ud800"]}', 422, "`inputs[0]` holds '\\ud800' at position 0"),
]


@pytest.mark.parametrize("route,body,status,fragment", BAD_INPUTS,
                         ids=[f"{r}-{s}-{i}" for i, (r, _, s, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_a_clear_error_body(http, route, body, status, fragment):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation"
    assert fragment in err["error"], err["error"]


def test_form_body_error_says_to_send_json(http):
    r = http.post("/embed", content=b"inputs=a", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]


@pytest.mark.parametrize("method,route,status,kind", [("GET", "/embed", 405, "method_not_allowed"),
                                                      ("GET", "/nope", 404, "not_found")])
def test_wrong_route_or_method_gets_an_error_body(http, method, route, status, kind):
    r = http.request(method, route)
    assert r.status_code == status and r.json()["error_type"] == kind


# ---- API key ------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers,fragment", [({}, "missing API key"),
                                              ({"Authorization": "Bearer nope"}, "wrong API key"),
                                              ({"Authorization": KEY}, "wrong API key")])
@pytest.mark.parametrize("route", ["/embed", "/v1/embeddings", "/info", "/tokenize"])
def test_api_key_is_required(server, headers, fragment, route):
    body = {"inputs": "a"} if route != "/v1/embeddings" else {"input": "a"}
    method = "GET" if route == "/info" else "POST"
    r = httpx.request(method, server.url + route, json=body if method == "POST" else None, headers=headers, timeout=60)
    assert r.status_code == 401 and r.json() == {"error": r.json()["error"], "error_type": "unauthorized"}
    assert fragment in r.json()["error"]


def test_api_key_is_checked_before_the_body(server):
    r = httpx.post(server.url + "/embed", content=b"{broken", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 401


def test_openai_client_with_a_wrong_key_gets_401(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(input="a", model="m")


def test_health_and_metrics_are_open_without_key(server):
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200
    r = httpx.get(server.url + "/metrics", timeout=60)
    assert r.status_code == 200 and "packformer_requests_total" in r.text


# ---- /predict on a classifier -------------------------------------------------------------------
def test_predict_labels_and_scores_equal_model_classify(classifier_server, classifier_dir):
    model = packformer.load(classifier_dir)
    texts = ["good movie", "bad", "neither here nor there " * 5]
    logits = model.classify(texts)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = ["negative", "neutral", "positive"]
    with httpx.Client(base_url=classifier_server.url, timeout=60) as c:
        batch = c.post("/predict", json={"inputs": texts}).json()
        single = c.post("/predict", json={"inputs": texts[0]}).json()
        raw = c.post("/predict", json={"inputs": texts, "raw_scores": True}).json()
        info = c.get("/info").json()
        emb = c.post("/embed", json={"inputs": texts, "normalize": False}).json()
    assert len(batch) == 3 and all(len(row) == 3 for row in batch)
    for row, p, lg, raw_row in zip(batch, probs, logits, raw):
        assert [x["label"] for x in row] == [labels[j] for j in np.argsort(-p, kind="stable")]
        close([x["score"] for x in row], np.sort(p)[::-1])
        raw_by_label = {x["label"]: x["score"] for x in raw_row}
        close([raw_by_label[lab] for lab in labels], lg)
    assert single == batch[0]
    assert info["model_type"] == "classifier" and info["labels"] == labels
    close(emb, model.encode(texts, normalize_embeddings=False))
