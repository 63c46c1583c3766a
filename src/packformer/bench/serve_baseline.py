"""The serving peer that bench-serve measures packformer against: a plain FastAPI app calling
`SentenceTransformer.encode` once per request, as a user would write it without a batching server.

The route is a sync `def`, so FastAPI runs it in its thread pool (the better of the two naive
choices: an `async def` calling encode would block the event loop). Same /embed body as TEI.
"""
from __future__ import annotations

import argparse
from typing import Union

from fastapi import FastAPI
from pydantic import BaseModel


class EmbedBody(BaseModel):
    inputs: Union[str, list[str]]
    normalize: bool = True


def create_baseline_app(model_dir: str, device: str = "cpu") -> FastAPI:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device=device)
    st.encode(["warm up"])
    app = FastAPI(title="baseline: FastAPI + SentenceTransformer.encode per request")

    @app.post("/embed")
    def embed(body: EmbedBody):
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        return st.encode(texts, normalize_embeddings=body.normalize).tolist()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="a sentence-transformers (or Hugging Face) model folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args(argv)
    uvicorn.run(create_baseline_app(args.model, args.device), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
