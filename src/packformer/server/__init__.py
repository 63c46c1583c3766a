"""`packformer serve`: an HTTP server (TEI- and OpenAI-compatible) over the token-budget scheduler."""
from .app import create_app
from .service import InferenceService
from .settings import ServerSettings
from .worker import Worker

__all__ = ["create_app", "ServerSettings", "InferenceService", "Worker"]
