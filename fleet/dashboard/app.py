"""Wire the dashboard into the controller's app: routes, static files, errors, headers."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from fleet.api.errors import validation_message
from fleet.dashboard import events, signin
from fleet.dashboard.guard import NoAdmin, SignInNeeded
from fleet.dashboard.pages import ROUTERS
from fleet.dashboard.templating import Pages
from fleet.errors import FleetError, InvalidInput

__all__ = ["SECURITY_HEADERS", "install"]

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"

# Everything the pages use is served by the controller itself: no CDN, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app`` (the controller's, built by :func:`fleet.app.create_app`)."""
    pages = Pages()
    app.state.pages = pages
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.include_router(signin.router)
    app.include_router(events.router)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    api_error = app.exception_handlers[FleetError]
    api_invalid = app.exception_handlers[RequestValidationError]

    async def fleet_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith("/ui/"):
            response: Response = await api_error(request, exc)  # type: ignore[misc]
            return response
        assert isinstance(exc, FleetError)
        if _is_htmx(request):
            return pages.render(
                request, None, "fragments/error.html", status_code=exc.status, error=exc
            )
        return pages.render(request, None, "error.html", status_code=exc.status, error=exc)

    async def invalid(request: Request, exc: Exception) -> Response:
        """A form FastAPI itself refused (a field missing or tampered with): HTML on pages."""
        if not request.url.path.startswith("/ui/"):
            response: Response = await api_invalid(request, exc)  # type: ignore[misc]
            return response
        assert isinstance(exc, RequestValidationError)
        error = InvalidInput(validation_message(list(exc.errors())))
        return await fleet_error(request, error)

    async def sign_in_needed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInNeeded)
        target = f"/ui/login?next={exc.next_path}"
        if _is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        if request.url.path == "/ui/events":
            return JSONResponse({"error": "sign in"}, status_code=401)
        return RedirectResponse(target, status_code=303)

    async def no_admin(request: Request, _exc: Exception) -> Response:
        return pages.render(request, None, "no_admin.html", status_code=503)

    app.add_exception_handler(FleetError, fleet_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(SignInNeeded, sign_in_needed)
    app.add_exception_handler(NoAdmin, no_admin)

    @app.middleware("http")
    async def headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Security headers on pages; every answer says how long the server took (benchmarks)."""
        started = time.perf_counter()
        response = await call_next(request)
        elapsed_ms = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = f"app;dur={elapsed_ms:.1f}"
        if request.url.path.startswith("/ui"):
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response
