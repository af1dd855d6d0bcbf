"""One place that turns the agent's error tree into HTTP: OpenAI's body, or the plain one.

The Open Inference Protocol (/v2) and Ollama's API (/api) both answer ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agent.errors import AgentError, Degraded, Overloaded

__all__ = ["error_body", "install_error_handlers"]

log = logging.getLogger(__name__)

_PLAIN_ERROR_PREFIXES = ("/v2/", "/api/")

_KIND_BY_STATUS = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(exc: AgentError) -> dict[str, Any]:
    return {
        "error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}
    }


def _respond(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    if request.url.path.startswith(_PLAIN_ERROR_PREFIXES):
        body = {"error": body["error"]["message"]}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(errors: list[Any]) -> tuple[str, str | None]:
    """A one-line reason from pydantic's error list, naming the first offending field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    field = ".".join(loc) or None
    if field is None and first.get("type") in {"model_attributes_type", "dict_type"}:
        return "The request body must be a JSON object", None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"Invalid value for '{field}': {msg}{more}" if field else f"{msg}{more}"), field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AgentError)
    async def agent_error(request: Request, exc: AgentError) -> JSONResponse:
        headers = (
            {"Retry-After": str(exc.retry_after)}
            if isinstance(exc, Overloaded | Degraded)
            else None
        )
        return _respond(request, exc.status, error_body(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _describe(list(exc.errors()))
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": field,
                "code": "invalid_request",
            }
        }
        return _respond(request, 400, body)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = _KIND_BY_STATUS.get(exc.status_code, "invalid_request_error")
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return _respond(request, exc.status_code, body, dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {
            "error": {
                "message": "internal error; see the agent's log",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
        return _respond(request, 500, body)
