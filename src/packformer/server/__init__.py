"""`packformer serve`: an HTTP server (TEI- and OpenAI-compatible) over the token-budget scheduler.

Layers, each usable alone: `packformer.scheduler.Scheduler` (batching queue, no torch) ->
`Worker` (the model thread) -> `InferenceService` (checks, tokenization, admission) -> `create_app`
(FastAPI routes, errors, metrics, API key). A Ray Serve deployment can wrap `create_app(model, settings)`.

Routes and their semantics:
- `POST /embed` (TEI): `{"inputs": str | [str], "normalize": true, "truncate": null}` -> `[[float]]`.
  `truncate` null means the server's --auto-truncate.
- `POST /v1/embeddings`, `POST /embeddings` (OpenAI): `input` is a text, texts, or token ids as tiktoken
  gives them, i.e. without special tokens: the server adds the model's ([CLS] ... [SEP]), so ids give the
  same vector as their text. Vectors follow the model's own normalization (all-MiniLM-L6-v2: unit
  length). `encoding_format: "base64"` sends little-endian float32 bytes, as OpenAI does. `dimensions: N`
  keeps the first N values and L2-renormalizes them, OpenAI's behaviour for its Matryoshka-trained
  models; on an encoder not trained that way the shortened vectors are valid but lose more quality.
  Over-long inputs are cut only with --auto-truncate (OpenAI's body has no truncate field).
- `POST /predict` (TEI): per input every label of the config's id2label with its softmax score (logits
  with `raw_scores`), best first; a str gives one list, a list of str a list of lists. No text pairs.
- `POST /tokenize`, `GET /health` (200 only when the model answers), `GET /info`, `GET /metrics`.

Errors are `{"error", "error_type"}`: 401 unauthorized (every route but /health and /metrics needs
`Authorization: Bearer KEY` when a key is set), 413 validation (body over --payload-limit, or an input
over the model's length with truncation off), 422 validation (bad body, empty input, too many inputs,
token ids outside the vocabulary, /predict on a model without a head), 429 overloaded (more than
--max-concurrent-requests in flight), 500 backend (the batch holding the request failed; other batches
are unaffected), 503 unhealthy (warming up, shutting down, or the worker died: restart the server).
"""
from .app import create_app
from .service import InferenceService
from .settings import ServerSettings
from .worker import Worker

__all__ = ["create_app", "ServerSettings", "InferenceService", "Worker"]
