"""Every error leaves the server as `{"error": message, "error_type": kind}` with a meaningful status.

The kinds follow text-embeddings-inference: validation (413/422), unauthorized (401), overloaded (429),
unhealthy (503), backend (500: the batch holding the request failed), plus not_found / method_not_allowed.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def validation(message: str) -> APIError:
    return APIError(422, message, "validation")


def too_large(message: str) -> APIError:
    return APIError(413, message, "validation")


def unhealthy(message: str) -> APIError:
    return APIError(503, message, "unhealthy")


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


_HTTP_KINDS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "validation",
               429: "overloaded", 503: "unhealthy"}


def describe_validation_errors(errors) -> str:
    """FastAPI's list of pydantic errors -> one readable line naming each bad field."""
    parts = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return error_response(exc.status, exc.message, exc.error_type, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        message = describe_validation_errors(exc.errors())
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:
            message += f" (the body must be JSON sent with 'Content-Type: application/json'; got {ctype or 'none'!r})"
        return error_response(422, message, "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), _HTTP_KINDS.get(exc.status_code, "http"),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "backend")
