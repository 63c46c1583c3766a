"""`packformer serve --ray`: the HTTP API of packformer.server as a Ray Serve application of N replicas.

Each replica is a Ray actor that loads the model once (on its own GPU when `gpus_per_replica` is 1)
and runs the very app of the single-process server, `packformer.server.create_app(model, settings)`:
the same routes, limits, errors and token-budget dynamic batching, inside each replica. The app is
built in the replica (Serve's late-bound `serve.ingress()` + `__serve_build_asgi_app__`), so the model
is never pickled; Serve runs the app's lifespan, which starts and drains the replica's model worker.
Serve's proxy spreads requests over the replicas, and its health check replaces a replica whose model
worker died. `/metrics` and `/info` describe the one replica that answered.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from ..server.settings import ServerSettings

APP_NAME = "packformer"


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica needs: how to load the model, the server settings and its share of the cores."""

    model: Any = None            # path / name / 'random:<preset>' / None (built-in), or a zero-arg factory
    device: str = "cpu"
    dtype: str | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)
    threads: int = 1
    task: str | None = None      # models with task adapters: the task of requests that name none


@serve.ingress()
class PackformerReplica:
    def __init__(self, spec: ReplicaSpec):
        import packformer
        from packformer.fast.cpu_threads import limit_process_threads

        limit_process_threads(spec.threads)   # replicas share the machine's cores
        self.spec = spec
        self.model = spec.model() if callable(spec.model) else packformer.load(
            spec.model, device=spec.device, dtype=spec.dtype, max_batch_tokens=spec.settings.max_batch_tokens,
            task=spec.task)
        self.server_app = None

    def __serve_build_asgi_app__(self):
        from ..server import create_app

        # Serve routes to a replica once the app's startup returns: warm the model first, or the proxy
        # sends requests to a replica that can only answer 503 "warming up"
        self.server_app = create_app(self.model, self.spec.settings, warm_before_serving=True)
        return self.server_app

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model worker died is replaced."""
        service = getattr(getattr(self.server_app, "state", None), "service", None)
        if service is not None and service.worker.error is not None:
            raise RuntimeError(f"the model worker died: {service.worker.error}")


def deployment(spec: ReplicaSpec, replicas: int, gpus_per_replica: float, cpus_per_replica: float):
    """The bound Serve application. A replica admits up to max_concurrent_requests requests so that its
    own scheduler batches them (Serve's default of 5 in flight would starve the batching)."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be 0 or more, got {gpus_per_replica}")
    d = serve.deployment(PackformerReplica, name="PackformerReplica").options(
        num_replicas=replicas, max_ongoing_requests=spec.settings.max_concurrent_requests,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    return d.bind(spec)


def start(model: Any = None, settings: ServerSettings | None = None, *, replicas: int = 1,
          gpus_per_replica: float = 0, cpus_per_replica: float | None = None, dtype: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, strict: bool = True, task: str | None = None) -> str:
    """Deploy on the Ray this process is connected to (call ray.init first); returns the base URL once
    every replica runs. Stop with `stop()`. Not enough CPUs/GPUs for the replicas: RuntimeError, or
    with strict=False (a cluster that may autoscale) a warning. `task` (models with task adapters): the
    task of requests that name none."""
    import ray

    from .dataset import check_resources, replica_cpus

    if callable(model) and task is not None:
        raise ValueError("a model factory loads its own task: pass task= to packformer.load() inside it")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized: call ray.init() (or use `packformer serve --ray`)")
    settings = settings or ServerSettings()
    cpus = replica_cpus(replicas, cpus_per_replica)
    check_resources(replicas, cpus, gpus_per_replica, strict=strict)
    spec = ReplicaSpec(model=model, device="cuda" if gpus_per_replica > 0 else "cpu", dtype=dtype,
                       settings=settings, threads=max(1, int(cpus)), task=task)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(spec, replicas, gpus_per_replica, cpus), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the application and stop Serve (its proxy and controller)."""
    serve.shutdown()


def wait_healthy(url: str, timeout: float = 300.0) -> None:
    """Block until GET /health answers 200 (a replica's model is warm). Standard library only: the ray
    extra brings no HTTP client (httpx is a dev dependency)."""
    import http.client
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))    # our own server: no proxy
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with opener.open(url + "/health", timeout=10.0) as r:
                if r.status == 200:
                    return
                last = f"{r.status} {r.read(200)!r}"
        except urllib.error.HTTPError as e:          # a non-2xx answer, e.g. 503 while the model loads
            last = f"{e.code} {e.read(200)!r}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:   # not up yet, reset, timeout
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not 200 within {timeout:g} s (last: {last})")


def serve_forever(model: Any, settings: ServerSettings, *, replicas: int, gpus_per_replica: float,
                  cpus_per_replica: float | None, dtype: str | None, host: str, port: int,
                  ray_address: str | None, task: str | None = None) -> int:
    """`packformer serve --ray`: deploy, print where, and run until SIGINT/SIGTERM, then shut Serve down."""
    import sys

    from .dataset import ray_session

    stop_event = threading.Event()
    with ray_session(ray_address):
        # after ray.init, which installs handlers of its own (its SIGTERM one aborts the process)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop_event.set())
        url = start(model, settings, replicas=replicas, gpus_per_replica=gpus_per_replica,
                    cpus_per_replica=cpus_per_replica, dtype=dtype, host=host, port=port, strict=not ray_address,
                    task=task)
        try:
            wait_healthy(url)
            print(f"packformer serve --ray: {replicas} replica(s) on {url}", file=sys.stderr, flush=True)
            stop_event.wait()
        finally:
            stop()
    return 0
