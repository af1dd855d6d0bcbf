"""One place that turns the controller's error tree into HTTP: ``{"error": {code, message}}``.

Every failure a client sees has that shape (FastAPI's own 404/405s and request
validation errors included), so the CLI and the agent parse one thing. Database
outages are translated here, at the boundary, into ``DatabaseUnavailable`` (503).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from fleet.errors import DatabaseUnavailable, FleetError, RateLimited

__all__ = ["error_response", "install_error_handlers", "validation_field", "validation_message"]

log = logging.getLogger(__name__)

_CODE_BY_STATUS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    field: str | None = None,
) -> JSONResponse:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field  # dotted, e.g. "stages.percents"
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def validation_field(errors: list[Any]) -> str | None:
    """The dotted name of the first offending field, if the error names one."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in {"body", "query", "path"}]
    return ".".join(loc) or None


def validation_message(errors: list[Any]) -> str:
    """A one-line reason from pydantic's error list, naming the first offending field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    loc = [str(p) for p in first.get("loc", ()) if p not in {"body", "query", "path"}]
    msg = str(first.get("msg", "invalid request"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = ".".join(loc)
    return f"invalid {where}: {msg}{more}" if where else f"{msg}{more}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FleetError)
    async def fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        headers = None
        if exc.status == 401:
            headers = {"WWW-Authenticate": getattr(exc, "challenge", "Bearer")}
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
        field = getattr(exc, "field", None)
        return error_response(exc.status, exc.code, str(exc) or exc.code, headers, field=field)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        return error_response(
            422, "invalid_input", validation_message(errors), field=validation_field(errors)
        )

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = _CODE_BY_STATUS.get(exc.status_code, "http_error")
        return error_response(
            exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None
        )

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc.orig)
        err = DatabaseUnavailable("the database is unavailable; retry shortly")
        return error_response(err.status, err.code, str(err), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def crashed(request: Request, _exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the controller's log")
