"""`packformer serve`: an HTTP server with token-budget dynamic batching, TEI- and OpenAI-compatible.

SIGTERM stops accepting connections, lets the requests in flight finish (uvicorn's graceful shutdown),
drains the model worker and exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from .common import NON_NEGATIVE_NUMBER, PORT, POSITIVE, POSITIVE_NUMBER, add_model_options, load_model

DEFAULT_MAX_BATCH_TOKENS = 16384


def add_parser(sub):
    p = sub.add_parser("serve", help="serve a model over HTTP (TEI / OpenAI embeddings API)",
                       description="Serve a model over HTTP with dynamic batching under a token budget. Routes: "
                                   "POST /embed, /v1/embeddings, /embeddings, /predict, /tokenize; "
                                   "GET /health, /info, /metrics, /docs.")
    add_model_options(p, positional=True)
    p.set_defaults(max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=PORT, default=8080, help="port (default: 8080)")
    p.add_argument("--max-batch-requests", type=POSITIVE, default=None, help="max inputs in one batch (default: no cap)")
    p.add_argument("--max-concurrent-requests", type=POSITIVE, default=512,
                   help="requests in flight before answering 429 (default: 512)")
    p.add_argument("--max-client-batch-size", type=POSITIVE, default=32,
                   help="max inputs in one request, beyond it 422 (default: 32)")
    p.add_argument("--payload-limit", type=POSITIVE, default=2_000_000, help="max request body in bytes (default: 2 MB)")
    p.add_argument("--api-key", default=os.environ.get("PACKFORMER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PACKFORMER_API_KEY, else no key)")
    p.add_argument("--auto-truncate", action="store_true",
                   help="cut over-long inputs instead of answering 413, unless a request says otherwise")
    p.add_argument("--model-name", default=None, help="name reported by /info and in OpenAI responses")
    p.add_argument("--task", default=None,
                   help="models with task adapters (jina-embeddings-v3): the task of requests that name none "
                        "(a request's \"task\" field picks another; default: the base weights)")
    p.add_argument("--warm-tasks", default=None, metavar="all|TASK,...",
                   help="models with task adapters: tasks merged and warmed before the server is ready, so that "
                        "their first request does not pause the worker (each costs a copy of the weights)")
    p.add_argument("--graceful-timeout", type=NON_NEGATIVE_NUMBER, default=30.0,
                   help="seconds to let requests in flight finish on SIGTERM (default: 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs CPU)")
    ray = p.add_argument_group("Ray Serve (pip install -e \".[ray]\")")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application of --replicas replicas")
    ray.add_argument("--replicas", type=POSITIVE, default=1, help="with --ray: model replicas (default: 1)")
    ray.add_argument("--gpus-per-replica", type=NON_NEGATIVE_NUMBER, default=None,
                     help="with --ray: GPUs per replica (default: 1 with a CUDA --device, else 0)")
    ray.add_argument("--cpus-per-replica", type=POSITIVE_NUMBER, default=None,
                     help="with --ray: CPUs (and torch threads) per replica (default: an equal share)")
    ray.add_argument("--ray-address", default=None, help="with --ray: join this Ray cluster (default: start a local Ray)")
    ray.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                     help="with --ray: what takes the HTTP requests. proxy: Ray Serve's Python proxy (one per node), "
                          "haproxy: Ray Serve's HAProxy ingress, which sends each request straight to a replica's "
                          "own HTTP port (30000 and up, on all interfaces); the proxy caps a node's request rate "
                          "(default: proxy)")
    return p


def settings_from_args(args):
    from ..server import ServerSettings

    return ServerSettings(
        max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
        max_concurrent_requests=args.max_concurrent_requests, max_client_batch_size=args.max_client_batch_size,
        api_key=args.api_key or None, auto_truncate=args.auto_truncate, payload_limit=args.payload_limit,
        model_name=args.model_name, drain_timeout_s=args.graceful_timeout,
        warm_tasks=tuple(t.strip() for t in args.warm_tasks.split(",") if t.strip()) if args.warm_tasks else ())


def run(args) -> int:
    if args.ray:
        from ..ray.serve_cli import run as run_on_ray
        return run_on_ray(args, settings_from_args(args))
    import uvicorn

    from ..server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    settings = settings_from_args(args)
    model = load_model(args)
    app = create_app(model, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=args.graceful_timeout,
                            lifespan="on")
    server = uvicorn.Server(config)
    print(f"packformer serve: {app.state.service.model_name} on http://{args.host}:{args.port} "
          f"(warming up; GET /health says 200 when ready)", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it shut down on once it has restored the previous handler; with this
    # handler in place, a SIGTERM ends in a graceful shutdown and exit status 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1
