"""The fleet controller as the source of updates: TUF metadata and artifacts, per device.

Both are fetched with the device's own credentials (HTTP Basic: device id and broker
password), so the controller serves a device only what it may see; the bytes are
trusted for what the verified metadata says of them, never for where they came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from agent.link.identity import Identity
from agent.update.tuf_client import TufClient
from models.paths import artifact_path

__all__ = ["FleetSource"]


class FleetSource:
    """Implements :class:`agent.update.updater.UpdateSource` against the controller."""

    def __init__(
        self,
        tuf: TufClient,
        identity: Identity,
        *,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.tuf = tuf
        self._base = identity.fleet_url.rstrip("/")
        self._http = httpx.AsyncClient(
            auth=httpx.BasicAuth(identity.device_id, identity.broker.password),
            timeout=httpx.Timeout(timeout_s, read=None),  # the downloader bounds stalls itself
            transport=transport,
            follow_redirects=False,
        )

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    def verified_targets(self, paths: list[str]) -> Mapping[str, Any]:
        """Blocking: refresh TUF, then each path's verified target (None when unlisted)."""
        self.tuf.refresh()
        return {path: self.tuf.find(path) for path in paths}

    def artifact_url(self, sha256: str) -> str:
        return self._base + artifact_path(sha256)

    async def aclose(self) -> None:
        await self._http.aclose()
