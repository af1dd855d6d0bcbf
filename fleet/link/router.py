"""Ingest routing: each message from a device is parsed, its sender checked, then buffered.

:meth:`IngestRouter.handle` parses a message once (:func:`fleet.link.ingest.parse`),
asks the device directory (a cache of device ids, refreshed from the database) about
its sender and hands it to the batch writer (:mod:`fleet.link.writer`). A message from
an id the directory does not know yet is parked until the next refresh, which comes at
once (at most one a second): the device may have enrolled a moment ago, or on another
replica. Rejections are counted by reason and logged at a bounded rate.

Each message comes with a *settle* callback (the session's acknowledgement to the
broker, None when none is awaited). A rejected message is settled at once: it will
never be stored. An accepted one hands it to the writer, which settles it after the
transaction that stored it has committed; a parked one keeps it until then.

Entering the router starts the writer's flusher and the directory refresh; leaving it
stores what was buffered, trying for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from fleet.config import FleetSettings
from fleet.errors import DatabaseUnavailable
from fleet.link import store
from fleet.link.broker_auth import DeviceCredential
from fleet.link.ingest import Accepted, DeviceDirectory, Reason, Rejection, Standing, parse
from fleet.link.logs import RateLimitedLog
from fleet.link.tasks import cancel, spawn
from fleet.link.writer import BatchWriter, Settle
from models.topics import Channel, DeviceTopic

__all__ = ["IngestRouter"]

log = logging.getLogger(__name__)

DIRECTORY_REFRESH_S = 30.0  # re-read device ids this often, besides after sync_auth
UNKNOWN_REFRESH_GAP_S = 1.0  # at most one extra re-read a second for unknown ids
MAX_PARKED = 10_000  # messages from unknown ids waiting for that re-read
SHUTDOWN_FLUSH_S = 10.0  # how long exit keeps trying to store what is buffered
REJECT_LOG_EVERY_S = 10.0  # per reason


class IngestRouter:
    """Messages in, batched rows out; counts what it received and what it rejected."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: FleetSettings,
        *,
        retry_delay: Callable[[int], float],
        warn: RateLimitedLog,
    ) -> None:
        self._engine = engine
        self._warn = warn
        self._directory = DeviceDirectory()
        self._parked: list[tuple[Accepted, Settle | None]] = []
        self._refresh_now = asyncio.Event()
        self._reject_log = RateLimitedLog(log, REJECT_LOG_EVERY_S)
        self.writer = BatchWriter(
            engine,
            batch_rows=settings.ingest_batch_rows,
            flush_s=settings.ingest_flush_ms / 1000,
            retry_delay=retry_delay,
            reject=self.reject,
            warn=warn.warning,
        )
        self.received = 0  # messages handed in
        self.rejected: Counter[str] = Counter()  # by Reason value
        self._flusher: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IngestRouter:
        self._flusher = spawn(self.writer.run(), "flusher")
        self._refresher = spawn(self._refresh_loop(), "directory")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.writer.close(SHUTDOWN_FLUSH_S)
        if self._flusher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher), SHUTDOWN_FLUSH_S + 5)
            except TimeoutError:
                await cancel(self._flusher)
        if self._refresher is not None:
            await cancel(self._refresher)
        self.writer.shutdown()

    def handle(
        self, topic: str, payload: Any, retained: bool, settle: Settle | None = None
    ) -> None:
        """Route one message; never raises (a bug is logged and counted, the session goes on).

        ``settle`` is called once the message is stored, or at once when it is rejected.
        """
        try:
            kept = self._route(topic, payload, retained, settle)
        except Exception:
            log.exception("ingest failed on a message on %s", topic)
            self.rejected[Reason.INTERNAL_ERROR.value] += 1
            kept = False
        if not kept and settle is not None:
            settle()

    def _route(self, topic: str, payload: Any, retained: bool, settle: Settle | None) -> bool:
        """True when the message was buffered or parked (and ``settle`` handed on with it)."""
        self.received += 1
        data = payload if isinstance(payload, bytes) else bytes(payload or b"")
        if not data and topic.endswith("/" + Channel.REPORTED.value):
            return False  # a retained reported state being cleared (clear_desired)
        result = parse(topic, data, received_at=datetime.now(UTC), retained=retained)
        if isinstance(result, Rejection):
            self.reject(result)
            return False
        standing = self._directory.standing(result.device_id)
        if standing is Standing.ACTIVE:
            self.writer.add(result, settle)
            return True
        if standing is Standing.REVOKED:
            self.reject(Rejection(Reason.REVOKED_DEVICE, "the device is revoked", topic))
            return False
        if len(self._parked) < MAX_PARKED:
            self._parked.append((result, settle))
            self._refresh_now.set()
            return True
        self.reject(Rejection(Reason.UNKNOWN_DEVICE, "no such device", topic))
        return False

    def reject(self, rejection: Rejection) -> None:
        """Count a dropped message and log it (rate-limited per reason)."""
        self.rejected[rejection.reason.value] += 1
        self._reject_log.warning(
            rejection.reason.value,
            "rejected a message on %s: %s: %s",
            rejection.topic,
            rejection.reason.value,
            rejection.detail,
        )

    def install(self, credentials: list[DeviceCredential]) -> None:
        """Replace the directory; parked messages go to the writer or are rejected now."""
        self._directory.replace({c.device_id: c.revoked for c in credentials})
        parked, self._parked = self._parked, []
        for item, settle in parked:
            standing = self._directory.standing(item.device_id)
            if standing is Standing.ACTIVE:
                self.writer.add(item, settle)
                continue
            topic = str(DeviceTopic(item.device_id, item.channel))
            if standing is Standing.REVOKED:
                self.reject(Rejection(Reason.REVOKED_DEVICE, "the device is revoked", topic))
            else:
                self.reject(Rejection(Reason.UNKNOWN_DEVICE, "no such device", topic))
            if settle is not None:
                settle()

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(), DIRECTORY_REFRESH_S)
            self._refresh_now.clear()
            try:
                credentials = await asyncio.to_thread(store.load_credentials, self._engine)
            except DatabaseUnavailable as exc:
                self._warn.warning("directory", "cannot re-read device ids: %s", exc)
            else:
                self.install(credentials)
            await asyncio.sleep(UNKNOWN_REFRESH_GAP_S)
