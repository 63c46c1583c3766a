"""Rerank routes of a cross-encoder: TEI's `POST /rerank` and the Cohere / Jina-style `POST /v1/rerank` and
`POST /v2/rerank`. A request's (query, document) pairs are tokenized on arrival and queued as one scheduler
entry each (packed with other traffic under the token budget), then answered together.

`rerank_logits(svc, query, texts, truncate)` is the shared core (checks, admission, tokenization, scoring);
`tei_rerank(body, request)` is TEI's handler, which TEI's `POST /` dispatch can call for a reranker."""
from __future__ import annotations

import asyncio
import uuid
from typing import Literal, Optional, Union

import numpy as np
import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..tokenize import check_text
from .errors import too_large, validation
from .routes import ERRORS, json_response, service_of
from .service import INLINE_TOKENIZE_CHARS, RERANKERS, InferenceService

router = APIRouter()
TRUNCATE_HINT = ' (send "truncate": true, or start the server with --auto-truncate)'
ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank")


# ---- bodies -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RerankRequest(_Body):
    """TEI's /rerank."""
    query: StrictStr
    texts: list[StrictStr]
    truncate: Optional[StrictBool] = Field(None, description="cut over-long pairs (default: the server's --auto-truncate)")
    truncation_direction: Literal["Right", "right"] = "Right"
    raw_scores: StrictBool = Field(False, description="logits instead of sigmoid scores")
    return_text: StrictBool = False


class RankedText(BaseModel):
    index: int
    score: float
    text: Optional[str] = None


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class CohereRerankRequest(_Body):
    """Cohere's /v1/rerank and /v2/rerank (and Jina's): documents as strings or {"text": ...} objects."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: Optional[StrictStr] = None
    query: StrictStr
    documents: list[Union[StrictStr, DocumentObject]]
    top_n: Optional[StrictInt] = Field(None, ge=1, description="return the best N (default: all)")
    return_documents: StrictBool = False
    max_tokens_per_doc: Optional[StrictInt] = Field(None, description="not supported: pairs are cut to the "
                                                    "model's maximum length, longest side first")


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: Optional[DocumentObject] = None


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    model: str
    usage: dict
    meta: dict


# ---- the shared core ------------------------------------------------------------------------------------
async def rerank_logits(svc: InferenceService, query: str, texts: list[str], truncate: bool,
                        hint: str = "", field: str = "texts") -> tuple[np.ndarray, int]:
    """(query, text) pairs -> (logits [N] in input order, tokens used). 422 for an empty query or texts, too
    many texts, or a model that is not a one-label cross-encoder; 413 for an over-long pair with truncation
    off; 429 when overloaded. Callers apply the activation their protocol wants."""
    if svc.kind != "reranker":
        raise validation(f"model {svc.model_name} is an {svc.kind} model: {RERANKERS}")
    if svc.model.num_labels != 1:
        raise validation(f"model {svc.model_name} has {svc.model.num_labels} labels; reranking needs one score "
                         "per pair (one label)")
    if not query:
        raise validation("`query` is empty")
    if not texts:
        raise validation(f"`{field}` is empty: give at least one document")
    limit = svc.settings.max_client_batch_size
    if len(texts) > limit:            # an empty document is a valid candidate (it scores low); too many are not
        raise validation(f"`{field}` has {len(texts)} documents, more than the maximum of {limit} "
                         "(--max-client-batch-size); split the request")
    try:                                # a lone surrogate ("\ud800" in the JSON): 422, not a tokenizer crash
        check_text(query, "`query`")
        for i, t in enumerate(texts):
            check_text(t, f"`{field}[{i}]`")
    except ValueError as e:
        raise validation(str(e)) from e
    pairs = [(query, t) for t in texts]
    with svc.admit():
        try:
            if len(query) * len(texts) + sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
                seqs = svc.model.pair_ids(pairs, truncate)
            else:
                seqs = await asyncio.to_thread(svc.model.pair_ids, pairs, truncate)
        except ValueError as e:
            raise too_large(f"{e}{hint}".replace("pairs[", f"{field}[")) from e
        logits = await svc.score(seqs)                       # [N, 1]
    return logits[:, 0], sum(map(len, seqs))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(x)).numpy()                 # fp32, as CrossEncoder's Sigmoid


def _order(scores: np.ndarray) -> list[int]:
    """Indices by score, best first; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# ---- TEI -------------------------------------------------------------------------------------------------
async def tei_rerank(body: RerankRequest, request: Request):
    """`texts` ranked against `query`, best first (TEI): sigmoid scores, or logits with raw_scores."""
    svc = service_of(request)
    logits, _ = await rerank_logits(svc, body.query, body.texts, svc.truncate_default(body.truncate), TRUNCATE_HINT)
    scores = logits if body.raw_scores else _sigmoid(logits)
    out = []
    for i in _order(scores):
        r = {"index": i, "score": float(scores[i])}
        if body.return_text:
            r["text"] = body.texts[i]
        out.append(r)
    return json_response(out)


router.add_api_route("/rerank", tei_rerank, methods=["POST"], response_model=list[RankedText],
                     response_model_exclude_none=True, responses=ERRORS, tags=["TEI"], summary="Rerank (TEI)")


# ---- Cohere / Jina ---------------------------------------------------------------------------------------
def _cohere(version: str):
    async def cohere_rerank(body: CohereRerankRequest, request: Request):
        svc = service_of(request)
        if body.max_tokens_per_doc is not None:
            raise validation(f"`max_tokens_per_doc` is not supported: each (query, document) pair is cut to the "
                             f"model's maximum of {svc.model.max_seq_length} tokens, longest side first")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        # Cohere's API truncates long documents itself: so does this route
        logits, n_tokens = await rerank_logits(svc, body.query, texts, True, field="documents")
        with torch.inference_mode():                         # the folder's activation, as CrossEncoder.rank
            scores = svc.model.activation_fn(torch.from_numpy(logits)).numpy()
        results = []
        for i in _order(scores)[:body.top_n]:
            r = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                r["document"] = {"text": texts[i]}
            results.append(r)
        return json_response({
            "id": str(uuid.uuid4()), "results": results, "model": svc.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": n_tokens, "output_tokens": 0}},
        })
    return cohere_rerank


for _v in ("1", "2"):
    router.add_api_route(f"/v{_v}/rerank", _cohere(_v), methods=["POST"], response_model=CohereRerankResponse,
                         responses=ERRORS, tags=["Cohere"], summary=f"Rerank (Cohere v{_v} / Jina)")
