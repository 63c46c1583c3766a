"""The HTTP routes: TEI (/embed, /predict, /tokenize, /health, /info), OpenAI (/v1/embeddings and
/embeddings) and Prometheus (/metrics). Each route only translates its protocol; the shared work is in
InferenceService."""
from __future__ import annotations

import json
from typing import Any, Union

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from .errors import error_response, validation
from .formats import predictions, shorten, to_base64
from .schemas import (EmbedRequest, ErrorBody, Info, OpenAIEmbeddingRequest, OpenAIEmbeddingResponse, Prediction,
                      PredictRequest, SimpleToken, TokenizeRequest)
from .service import InferenceService

try:                          # numpy-aware and ~10x faster for big float arrays; optional
    import orjson

    def json_response(obj: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")
except ImportError:           # pragma: no cover - depends on the environment
    def json_response(obj: Any, status: int = 200) -> Response:
        def default(o):
            if isinstance(o, np.ndarray):
                return o.tolist()
            raise TypeError(f"not JSON serializable: {type(o).__name__}")
        return Response(json.dumps(obj, default=default), status, media_type="application/json")

ERRORS = {code: {"model": ErrorBody} for code in (401, 413, 422, 429, 500, 503)}
router = APIRouter()
TRUNCATE_HINT = ' (send "truncate": true, or start the server with --auto-truncate)'
AUTO_TRUNCATE_HINT = " (start the server with --auto-truncate to cut such inputs)"


def service_of(request: Request) -> InferenceService:
    return request.app.state.service


def _as_list(inputs: Union[str, list]) -> list:
    return [inputs] if isinstance(inputs, str) else inputs


@router.post("/embed", response_model=list[list[float]], responses=ERRORS, tags=["TEI"])
async def embed(body: EmbedRequest, request: Request):
    """Embeddings of one text or a list of texts, in input order (TEI)."""
    svc = service_of(request)
    texts = _as_list(body.inputs)
    svc.check_batch(texts, "inputs")
    task = svc.resolve_task(body.task)
    prefix, skip = svc.resolve_prompt(body.prompt_name, task)
    dims = svc.dimensions(body.dimensions)
    with svc.admit():
        ids = await svc.token_ids(texts, svc.truncate_default(body.truncate), TRUNCATE_HINT, task, prefix)
        emb = await svc.embed(ids, body.normalize, task, skip)
    if dims is not None:                # TEI: cut, then normalize (when asked)
        emb = shorten(emb, dims) if body.normalize else np.ascontiguousarray(emb[:, :dims])
    return json_response(emb)


async def _openai_embeddings(body: OpenAIEmbeddingRequest, request: Request):
    svc = service_of(request)
    inp = body.input
    pretokenized = isinstance(inp, list) and len(inp) > 0 and not isinstance(inp[0], str)
    items = [inp] if isinstance(inp, str) or (pretokenized and isinstance(inp[0], int)) else inp
    svc.check_batch(items, "input")
    dims = svc.dimensions(body.dimensions)
    task = svc.resolve_task(body.task)
    if pretokenized and body.prompt_name is not None:
        raise validation("`prompt_name` applies to text inputs; token-id inputs are the model's input as given")
    prefix, skip = ("", 0) if pretokenized else svc.resolve_prompt(body.prompt_name, task)
    with svc.admit():
        if pretokenized:        # ids are the model's input as given: no instruction is added
            ids = svc.wrap_ids(items, svc.settings.auto_truncate)
        else:
            ids = await svc.token_ids(items, svc.settings.auto_truncate, AUTO_TRUNCATE_HINT, task, prefix)
        emb = await svc.embed(ids, None, task, skip)                      # [N, D]
    if dims is not None:
        emb = shorten(emb, dims)
    if body.encoding_format == "base64":
        rows = [to_base64(r) for r in emb]
    else:
        rows = list(emb)
    n_tokens = sum(map(len, ids))
    return json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "model": svc.model_name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    })


router.add_api_route("/v1/embeddings", _openai_embeddings, methods=["POST"], response_model=OpenAIEmbeddingResponse,
                     responses=ERRORS, tags=["OpenAI"], summary="Embeddings (OpenAI-compatible)")
router.add_api_route("/embeddings", _openai_embeddings, methods=["POST"], response_model=OpenAIEmbeddingResponse,
                     responses=ERRORS, tags=["OpenAI"], summary="Embeddings (OpenAI-compatible, no /v1 prefix)")


@router.post("/predict", response_model=Union[list[Prediction], list[list[Prediction]]], responses=ERRORS,
             tags=["TEI"])
async def predict(body: PredictRequest, request: Request):
    """Per input, every label with its score (softmax, or logits with raw_scores), best first (TEI).
    A single text gives one list; a list of texts gives a list of lists."""
    svc = service_of(request)
    texts = _as_list(body.inputs)
    svc.check_batch(texts, "inputs")
    with svc.admit():
        ids = await svc.token_ids(texts, svc.truncate_default(body.truncate), TRUNCATE_HINT)
        logits = await svc.classify(ids)                                  # [N, C]
    out = predictions(logits, svc.model.config.labels(), body.raw_scores)
    return json_response(out[0] if isinstance(body.inputs, str) else out)


@router.post("/tokenize", response_model=list[list[SimpleToken]], responses=ERRORS, tags=["TEI"])
async def tokenize(body: TokenizeRequest, request: Request):
    """The tokens of each text (untruncated), with character offsets where the tokenizer knows them."""
    svc = service_of(request)
    texts = _as_list(body.inputs)
    svc.check_batch(texts, "inputs")
    return json_response(svc.tokens(texts, body.add_special_tokens))


@router.get("/health", responses={503: {"model": ErrorBody}}, tags=["service"])
async def health(request: Request):
    """200 only when the model answers (a recent batch or a probe); 503 while starting or dead."""
    why = await service_of(request).health()
    if why is not None:
        return error_response(503, why, "unhealthy", {"Retry-After": "1"})
    return json_response({"status": "ok"})


@router.get("/info", response_model=Info, tags=["service"])
async def info(request: Request):
    """Model, dimensions, maximum input length, limits and version."""
    return json_response(service_of(request).info())


@router.get("/metrics", tags=["service"])
async def metrics(request: Request):
    """Prometheus metrics of this server."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.CONTENT_TYPE)


ROUTES = ("/embed", "/v1/embeddings", "/embeddings", "/predict", "/tokenize", "/health", "/info", "/metrics")
