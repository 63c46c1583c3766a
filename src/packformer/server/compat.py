"""Routes that official clients call besides the embedding routes: OpenAI's model list
(`GET /v1/models`, `GET /v1/models/{id}`) and TEI's `POST /` (and SageMaker's `POST /invocations`), which
runs the route of the served model's kind, as text-embeddings-inference does: an embedding model ->
/embed (a SPLADE model -> /embed_sparse), a classifier -> /predict, a reranker -> /rerank.
`huggingface_hub.InferenceClient(base_url=...).feature_extraction()` posts to `/`."""
from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..sparse import sparse_kind
from .output_routes import EmbedSparseRequest, embed_sparse
from .rerank_routes import RerankRequest, tei_rerank
from .routes import ERRORS, embed, json_response, predict, service_of
from .schemas import EmbedRequest, PredictRequest

router = APIRouter()
CREATED = int(time.time())          # OpenAI's `created`: when this server process started
OWNER = "packformer"


# ---- OpenAI: models -------------------------------------------------------------------------------
class ModelObject(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": OWNER}


@router.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
async def list_models(request: Request):
    """The served model, in OpenAI's list format."""
    return json_response({"object": "list", "data": [_model_object(service_of(request).model_name)]})


@router.get("/v1/models/{model_id:path}", response_model=ModelObject, tags=["OpenAI"],
            responses={404: {"description": "no such model (OpenAI's error shape)"}})
async def retrieve_model(model_id: str, request: Request):
    """The served model by its id; 404 with OpenAI's error body for any other id."""
    name = service_of(request).model_name
    if model_id != name:
        return JSONResponse({"error": {"message": f"The model '{model_id}' does not exist; this server serves "
                                                  f"'{name}'", "type": "invalid_request_error",
                                       "param": "model", "code": "model_not_found"}}, status_code=404)
    return json_response(_model_object(name))


# ---- TEI: POST / ----------------------------------------------------------------------------------
async def _body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body checked against `schema`; errors answer 422 as on the route itself."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON",
                                       "ctx": {"error": str(e)}}]) from e
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


async def dispatch(request: Request):
    """The route of the served model's kind, as TEI's `/`: embedding -> /embed (SPLADE -> /embed_sparse),
    classifier -> /predict, reranker -> /rerank."""
    svc = service_of(request)
    if svc.kind == "reranker":
        return await tei_rerank(await _body(request, RerankRequest), request)
    if svc.kind == "classifier":
        return await predict(await _body(request, PredictRequest), request)
    if sparse_kind(svc.model) == "splade":
        return await embed_sparse(await _body(request, EmbedSparseRequest), request)
    return await embed(await _body(request, EmbedRequest), request)


for _path in ("/", "/invocations"):
    router.add_api_route(_path, dispatch, methods=["POST"], responses=ERRORS, tags=["TEI"],
                         summary="the served model's route (TEI): /embed, /embed_sparse, /predict or /rerank")

ROUTES = ("/", "/invocations", "/v1/models")
