"""The server's limits and options, one dataclass shared by the CLI, the app factory and tests."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Limits of `packformer serve` (the CLI flags of the same names).

    `max_batch_tokens` is the token budget of one packed batch built across requests;
    `max_batch_requests` caps the sequences (inputs) of one batch; `max_concurrent_requests` caps
    requests in flight (beyond it: 429, so the queue is bounded by
    max_concurrent_requests x max_client_batch_size sequences); `max_client_batch_size` caps the inputs
    of one request (beyond it: 422); `payload_limit` caps a request body in bytes (beyond it: 413).
    """

    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    api_key: str | None = None
    auto_truncate: bool = False          # default of `truncate` when a request does not say
    payload_limit: int = 2_000_000
    model_name: str | None = None        # reported by /info and in OpenAI responses (default: the model source)
    health_timeout_s: float = 10.0       # /health waits this long for the model to answer a probe
    drain_timeout_s: float = 30.0        # at shutdown, the worker finishes queued work for up to this long
    # models with task adapters: tasks merged and warmed before the server is ready ("all": every task),
    # besides the default; another task merges on its first request, pausing the worker meanwhile
    warm_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "payload_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_batch_requests is not None and self.max_batch_requests <= 0:
            raise ValueError(f"max_batch_requests must be positive, got {self.max_batch_requests}")
        if isinstance(self.warm_tasks, str):
            raise ValueError(f"warm_tasks must be a sequence of task names (or ('all',)), got {self.warm_tasks!r}")
        object.__setattr__(self, "warm_tasks", tuple(self.warm_tasks))
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset to serve without a key)")
