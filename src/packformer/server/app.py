"""`create_app(model, settings)`: a FastAPI app serving one loaded model.

Loading the model, the worker and the app are separate steps so the app can be wrapped elsewhere
(e.g. by a Ray Serve deployment): the app's lifespan starts the worker (which warms the model while
/health answers 503) and, at shutdown, drains it. `app.state.service` exposes the serving core.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from . import compat
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import APIKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .output_routes import ROUTES as OUTPUT_ROUTES, router as output_router
from .rerank_routes import ROUTES as RERANK_ROUTES, router as rerank_router
from .routes import ROUTES, router
from .service import InferenceService
from .settings import ServerSettings

if TYPE_CHECKING:
    from ..engine import Model


def create_app(model: "Model", settings: ServerSettings | None = None, *, warm_before_serving: bool = False) -> FastAPI:
    """`warm_before_serving`: the lifespan's startup returns only once the model is warm. A host that
    routes traffic as soon as startup ends (Ray Serve marks a replica running then) needs it; a lone
    server starts at once and answers 503 from /health until warm."""
    from .. import __version__

    settings = settings or ServerSettings()
    metrics = Metrics()
    service = InferenceService(model, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        if warm_before_serving:
            await asyncio.to_thread(service.wait_warm)
        try:
            yield
        finally:
            # uvicorn has already let the requests in flight finish; drain off the loop thread anyway
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="packformer", version=__version__, lifespan=lifespan,
                  description=f"Padding-free encoder inference serving {service.model_name}.")
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(compat.router)        # GET /v1/models, TEI's POST / (by model kind)
    app.include_router(output_router)          # /embed_sparse, /embed_all (sparse and per-token outputs)
    app.include_router(rerank_router)          # /rerank, /v1/rerank, /v2/rerank (cross-encoders)
    # add_middleware wraps: the last added is outermost. Order of a request: metrics -> key -> size.
    app.add_middleware(BodyLimitMiddleware, limit=settings.payload_limit)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=OUTPUT_ROUTES + ROUTES + compat.ROUTES + RERANK_ROUTES)
    return app
