"""Bound what a request body may cost: its size, and the time a client takes to send it.

A body over ``max_bytes`` is refused before it is read into memory (413). A client
that announces a body and then sends it slowly, or never, would otherwise hold a
connection and a request slot for as long as it likes: the whole body must arrive
within ``read_timeout_s`` (408). Only the body is timed; once it is complete,
``receive`` waits for the client's disconnect (streamed answers), untimed.
"""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit"]


class BodyLimit:
    """Pure ASGI middleware: checks Content-Length up front, counts and times the body."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    def _message(self) -> str:
        return f"Request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send)
            return
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        async def bounded_receive() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408, detail=f"Request body not received within {self.read_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:  # chunked upload: the route's error handler answers
                    raise HTTPException(413, detail=self._message())
            else:
                complete = True  # disconnected: nothing more will come
            return message

        await self.app(scope, bounded_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": self._message(),
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
