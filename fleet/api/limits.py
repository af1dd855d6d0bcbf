"""Bound what a request body may cost: its size, and the time a client takes to send it.

Enrollment is the one write anyone can reach without the admin token, so no body
(an admin's included) may make the controller buffer more than ``max_bytes`` (413).
A route that streams its body to disk (a model upload, a TUF metadata import) is
exempt from that cap (``unlimited`` names it) and enforces its own.

A client that announces a body and then sends it slowly, or never, would otherwise
hold a connection for as long as it likes. While the body is incomplete, each wait
for the next chunk lasts at most ``timeout_s``, and a body that is buffered (so at
most ``max_bytes``) must arrive whole within ``timeout_s`` of the first read; a
streamed upload may take as long as it needs as long as it keeps moving. On expiry
the answer is 408 and nothing more is read. Only the body is timed: once its last
chunk has arrived, ``receive`` waits for the client's disconnect (streamed answers),
untimed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BODY_TIMEOUT_S", "MAX_BODY_BYTES", "BodyLimit"]

MAX_BODY_BYTES = 1024 * 1024  # the largest body is a group desired state: far below this
BODY_TIMEOUT_S = 30.0  # seconds: the longest pause in a body, and the most a buffered one takes


class BodyLimit:
    """Pure ASGI middleware: checks Content-Length up front, counts and times the body."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        unlimited: Callable[[Scope], bool] | None = None,
        timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.unlimited = unlimited  # requests that stream their body instead of buffering it
        self.timeout_s = timeout_s

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = self.unlimited is not None and self.unlimited(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if (
            not streamed
            and declared is not None
            and (not declared.isdigit() or int(declared) > self.max_bytes)
        ):
            await self._reject(send)
            return
        loop = asyncio.get_running_loop()
        seen = 0
        complete = False
        whole_by: float | None = None  # the buffered body's deadline, from the first read

        async def bounded_receive() -> Message:
            nonlocal seen, complete, whole_by
            if complete:
                return await receive()
            now = loop.time()
            deadline = now + self.timeout_s
            if not streamed:
                whole_by = deadline if whole_by is None else whole_by
                deadline = min(deadline, whole_by)
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                complete = True  # read no further
                raise HTTPException(
                    408, detail=f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if not streamed and seen > self.max_bytes:
                    raise HTTPException(413, detail=self._message())  # a chunked body
            else:
                complete = True  # disconnected: nothing more will come
            return message

        await self.app(scope, bounded_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"error": {"code": "too_large", "message": self._message()}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
