"""The embedding servers bench-serve can drive next to `packformer serve`, with the same texts, request
count and load generator: how each one is started, where it takes texts, what a request body looks like
and where the embeddings are in its answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class PeerServer:
    name: str                                  # the results key and --peer value
    label: str                                 # printed next to its figures
    command: list[str]                         # ServerProcess adds --host and --port
    route: str                                 # POST route taking texts
    body: Callable[[list[str]], dict]          # texts -> request body
    env: dict = field(default_factory=dict)

    def embeddings(self, answer: dict) -> np.ndarray:
        """[N, D] from an OpenAI-style answer ({"data": [{"index", "embedding"}]}), in input order."""
        rows = sorted(answer["data"], key=lambda d: d["index"])
        return np.asarray([r["embedding"] for r in rows], dtype=np.float32)


def infinity(model_dir: str, device: str, pooling: str, dtype: str | None) -> PeerServer:
    """`infinity_emb v2` (torch engine) on the model folder; OpenAI-style POST /embeddings."""
    from .peer_infinity import QUIET_ENV, SERVED_NAME, server_command

    return PeerServer("infinity", "Infinity (infinity_emb v2, torch)",
                      server_command(model_dir, device, pooling, dtype=dtype), "/embeddings",
                      lambda texts: {"input": texts, "model": SERVED_NAME}, env=dict(QUIET_ENV))


SERVERS: dict[str, Callable[..., PeerServer]] = {"infinity": infinity}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The worst row-wise cosine between two [N, D] arrays (scale-free: servers may normalize or not)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def check_agreement(peer: PeerServer, url: str, texts: list[str], expected: np.ndarray) -> dict:
    """POST `texts` to the started server and compare its embeddings with `expected` (packformer's)."""
    import httpx

    answer = httpx.post(url + peer.route, json=peer.body(texts), timeout=120.0)
    answer.raise_for_status()
    return {"texts": len(texts), "min_cosine": round(min_cosine(peer.embeddings(answer.json()), expected), 6)}
