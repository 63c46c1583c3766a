"""Sparse and per-token outputs over HTTP, as text-embeddings-inference serves them:

- `POST /embed_sparse` -> `[[{"index": token id, "value": weight}]]` per input, by token id: a SPLADE
  model's vector (SparseEncoder folders) or bge-m3's lexical weights.
- `POST /embed_all` -> `[[[float]]]`: every token's hidden state per input (special tokens included,
  no padding rows).

Requests queue through the same scheduler as /embed (their own batch keys, the shared token budget) and
run on the model worker. `embed_sparse_rows(svc, body)` and `embed_all_rows(svc, body)` are the cores,
for other front ends (TEI's `POST /` dispatch) to call.
"""
from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ..sparse import sparse_kind
from .errors import validation
from .routes import ERRORS, TRUNCATE_HINT, json_response, service_of
from .schemas import PROMPT_NAME_DESCRIPTION, Texts
from .service import InferenceService
from .worker import SPARSE_KEY, TOKENS_KEY

router = APIRouter()
ROUTES = ("/embed_sparse", "/embed_all")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbedSparseRequest(_Body):
    inputs: Texts
    truncate: Optional[StrictBool] = Field(None, description="cut over-long inputs (default: the server's --auto-truncate)")
    truncation_direction: Literal["Right", "right"] = "Right"
    prompt_name: Optional[StrictStr] = Field(None, description=PROMPT_NAME_DESCRIPTION)


class EmbedAllRequest(EmbedSparseRequest):
    pass


class SparseValue(BaseModel):
    index: int
    value: float


def _texts(svc: InferenceService, inputs) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else inputs
    svc.check_batch(texts, "inputs")
    return texts


async def _run(svc: InferenceService, body: EmbedSparseRequest, key: tuple) -> list:
    """The request's texts (after its prompt) through the scheduler under `key`: one result row per input."""
    texts = _texts(svc, body.inputs)
    prefix, _ = svc.resolve_prompt(body.prompt_name)       # every token is kept: nothing is skipped
    with svc.admit():
        ids = await svc.token_ids(texts, svc.truncate_default(body.truncate), TRUNCATE_HINT, prefix=prefix)
        return await svc.run_rows(key, ids)


async def embed_sparse_rows(svc: InferenceService, body: EmbedSparseRequest) -> list[list[dict]]:
    """Per input, its nonzero (token id, weight) pairs as TEI's SparseValue dicts, by token id; 422 for a model
    without a sparse output."""
    if sparse_kind(svc.model) is None:
        raise validation(f"model {svc.model_name} has no sparse output: /embed_sparse needs a SPLADE model "
                         "(a sentence-transformers SparseEncoder folder) or bge-m3; use /embed")
    rows = await _run(svc, body, SPARSE_KEY)
    return [[{"index": int(i), "value": float(w)} for i, w in zip(tok, weights)] for tok, weights in rows]


async def embed_all_rows(svc: InferenceService, body: EmbedAllRequest) -> list:
    """Per input, its tokens' hidden states [Li, H] (numpy fp32); 422 for a cross-encoder."""
    if getattr(svc, "kind", "embedding") == "reranker":
        raise validation(f"model {svc.model_name} is a reranker (cross-encoder): it has no token embeddings "
                         "to serve; /embed_all needs an embedding model")
    return await _run(svc, body, TOKENS_KEY)


@router.post("/embed_sparse", response_model=list[list[SparseValue]], responses=ERRORS, tags=["TEI"])
async def embed_sparse(body: EmbedSparseRequest, request: Request):
    """Sparse vectors (SPLADE, or bge-m3's lexical weights): per input, its nonzero {index, value} (TEI)."""
    return json_response(await embed_sparse_rows(service_of(request), body))


@router.post("/embed_all", response_model=list[list[list[float]]], responses=ERRORS, tags=["TEI"])
async def embed_all(body: EmbedAllRequest, request: Request):
    """Every token's embedding (the last hidden states, no pooling): per input, [tokens][hidden] (TEI)."""
    return json_response(await embed_all_rows(service_of(request), body))
