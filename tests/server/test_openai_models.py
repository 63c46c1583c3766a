"""OpenAI's model routes on a real `packformer serve` process: GET /v1/models (list format) and
GET /v1/models/{id} through the official client; an unknown id is a 404 in OpenAI's error shape."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from packformer.bench.launch import ServerProcess

NAME = "acme/minilm-test"          # a slash, as Hugging Face ids have


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model-name", NAME, "--log-level", "warning"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_names_the_served_model(client):
    models = list(client.models.list())
    assert [m.id for m in models] == [NAME]
    m = models[0]
    assert m.object == "model" and m.owned_by == "packformer"
    assert abs(m.created - time.time()) < 3600


def test_models_list_is_openais_list_shape(server):
    body = httpx.get(server.url + "/v1/models").json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    assert set(body["data"][0]) == {"id", "object", "created", "owned_by"}


def test_model_retrieve_by_id_with_a_slash(client):
    m = client.models.retrieve(NAME)
    assert m.id == NAME and m.object == "model"


def test_unknown_model_is_404_in_openai_error_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    body = httpx.get(server.url + "/v1/models/nope").json()
    assert set(body) == {"error"} and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "model" and NAME in body["error"]["message"]


def test_the_embedding_model_name_matches_the_listed_id(client):
    r = client.embeddings.create(input="hello", model=NAME, encoding_format="float")
    assert r.model == NAME and len(r.data[0].embedding) == 384
