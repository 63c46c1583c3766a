"""Prometheus metrics of one server instance, in their own registry (several apps may share a process:
tests, or replicas of a Ray Serve deployment)."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = tuple(2 ** i for i in range(4, 18))          # 16 .. 131072
SIZE_BUCKETS = tuple(2 ** i for i in range(0, 12))           # 1 .. 2048


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("packformer_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_duration = Histogram("packformer_request_duration_seconds", "HTTP request duration",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("packformer_queue_duration_seconds",
                                        "time a sequence waited in the queue before its batch started",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_duration = Histogram("packformer_batch_duration_seconds", "model time of one packed batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tokens = Histogram("packformer_batch_tokens", "tokens in one packed batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("packformer_batch_size", "sequences in one packed batch",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.tokens = Counter("packformer_tokens", "tokens run through the model", registry=r)
        self.batch_failures = Counter("packformer_batch_failures", "batches that raised", registry=r)
        self.queue_size = Gauge("packformer_queue_size", "sequences waiting in the queue", registry=r)
        self.queue_tokens = Gauge("packformer_queue_tokens", "tokens waiting in the queue", registry=r)
        self.inflight = Gauge("packformer_inflight_requests", "requests being served", registry=r)
        self.tokens_per_second = Gauge("packformer_tokens_per_second",
                                       f"model throughput over the last {window_s:g} s", registry=r)
        self.ready = Gauge("packformer_ready", "1 when the model is warm and the worker alive", registry=r)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()      # (end time, tokens) of recent batches
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._throughput)

    def watch_queue(self, sequences: Callable[[], float], tokens: Callable[[], float]) -> None:
        self.queue_size.set_function(sequences)
        self.queue_tokens.set_function(tokens)

    def observe_batch(self, num_seqs: int, num_tokens: int, duration_s: float, queue_times: list[float]) -> None:
        self.batch_duration.observe(duration_s)
        self.batch_tokens.observe(num_tokens)
        self.batch_size.observe(num_seqs)
        self.tokens.inc(num_tokens)
        for q in queue_times:
            self.queue_duration.observe(q)
        with self._lock:
            self._recent.append((time.monotonic(), num_tokens))

    def _throughput(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)
