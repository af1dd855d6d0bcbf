"""Read Ollama-API bodies as JSON whatever their Content-Type, as Ollama does.

Ollama's documentation and countless scripts call it with ``curl -d '{...}'``, which
sends ``application/x-www-form-urlencoded``; Ollama binds the body as JSON anyway.
FastAPI parses a body as JSON only when the type says so, so for ``/api/`` POSTs the
declared type is replaced before routing. Other routes keep the strict behaviour.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["OllamaJsonBody"]

_JSON = (b"content-type", b"application/json")


class OllamaJsonBody:
    """Pure ASGI middleware: every POST under ``/api/`` is declared JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/api/")
        ):
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, _JSON]}
        await self.app(scope, receive, send)
