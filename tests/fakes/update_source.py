"""A fake of the controller as a source of updates (:class:`agent.update.updater.UpdateSource`).

It holds signed targets as python-tuf ``TargetFile`` objects (what ngclient hands the
real source) and serves their bytes by sha256 through an httpx ``MockTransport``, with
HTTP Range, so the real downloader runs against it. It can be told to fail the ways
the real controller fails: metadata that does not verify or cannot be fetched
(``verify_error``), an artifact swapped after signing (``serve``), and a server that
answers 503 (``down``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx
from tuf.api.metadata import TargetFile

from models.wire import TargetRef

__all__ = ["FakeUpdateSource"]

_RANGE = re.compile(r"bytes=(\d+)-")


class FakeUpdateSource:
    """Targets by path, artifacts by digest; ``requests`` counts what was asked of it."""

    def __init__(self) -> None:
        self.targets: dict[str, TargetFile] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> the bytes served for it
        self.verify_error: Exception | None = None  # raised by verified_targets
        self.down = False  # artifact requests answer 503
        self.verified: list[list[str]] = []  # the paths of each verified_targets call
        self.requests: list[httpx.Request] = []  # artifact requests, in order
        self._http = httpx.AsyncClient(transport=httpx.MockTransport(self._answer))

    def publish(self, path: str, data: bytes, **custom: Any) -> TargetRef:
        """Sign ``data`` as the target at ``path`` (with TUF custom fields); its reference."""
        target = TargetFile.from_data(path, data, ["sha256"])
        target.unrecognized_fields["custom"] = dict(custom)
        self.targets[path] = target
        sha256 = target.hashes["sha256"]
        self.blobs[sha256] = data
        return TargetRef(path=path, length=len(data), sha256=sha256)

    def serve(self, sha256: str, data: bytes) -> None:
        """Serve other bytes for ``sha256`` than were signed (an artifact swapped on disk)."""
        self.blobs[sha256] = data

    # -- UpdateSource ----------------------------------------------------------------

    def verified_targets(self, paths: list[str]) -> Mapping[str, Any]:
        self.verified.append(list(paths))
        if self.verify_error is not None:
            raise self.verify_error
        return {path: self.targets.get(path) for path in paths}

    def artifact_url(self, sha256: str) -> str:
        return f"http://fleet.test/api/v1/artifacts/{sha256}"

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the artifact server ---------------------------------------------------------

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            return httpx.Response(503)
        data = self.blobs.get(request.url.path.rsplit("/", 1)[-1])
        if data is None:
            return httpx.Response(404)
        match = _RANGE.fullmatch(request.headers.get("range", ""))
        if match is None:
            return _streamed(200, data)
        start = int(match.group(1))
        if start >= len(data):
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return _streamed(206, data[start:], headers)


def _streamed(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body is read as a stream, as from a real server."""
    headers = {**(headers or {}), "Content-Length": str(len(body))}
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))
