"""Database housekeeping while the link runs: presence and retention.

A device silent for three heartbeat intervals is marked offline (checked every half
interval, at most every 30 s); telemetry and events older than ``retention_days`` are
deleted at start and hourly. A round that fails is logged and the next one tries again.
With several replicas only the leader (``fleet.leases``) runs them: ``leads`` says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from fleet.config import FleetSettings
from fleet.errors import DatabaseUnavailable
from fleet.link import store
from fleet.link.logs import RateLimitedLog
from fleet.link.tasks import background

__all__ = ["RETENTION_EVERY_S", "Housekeeping", "presence_interval_s"]

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0
MISSED_HEARTBEATS = 3  # silent this many heartbeat intervals: offline


def presence_interval_s(heartbeat_interval_s: float) -> float:
    """How often to look for silent devices: half a heartbeat, within [0.05 s, 30 s]."""
    return min(max(heartbeat_interval_s / 2, 0.05), 30.0)


class Housekeeping:
    """Runs the presence and retention rounds in the background while entered."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: FleetSettings,
        warn: RateLimitedLog,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._warn = warn
        self._leads = leads
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Housekeeping:
        presence_s = presence_interval_s(self._settings.heartbeat_interval_s)
        await self._start("presence", self.mark_offline, presence_s, first_after_s=presence_s)
        await self._start("retention", self.prune, RETENTION_EVERY_S)  # at start, then hourly
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def mark_offline(self) -> None:
        """Mark offline the devices silent for three heartbeats (blocking)."""
        silent = timedelta(seconds=MISSED_HEARTBEATS * self._settings.heartbeat_interval_s)
        changed = store.mark_offline(self._engine, datetime.now(UTC) - silent)
        if changed:
            log.info("%d device(s) went silent: marked offline", changed)

    def prune(self) -> None:
        """Delete telemetry and events older than ``retention_days`` (blocking)."""
        cutoff = datetime.now(UTC) - timedelta(days=self._settings.retention_days)
        samples, events = store.prune(self._engine, cutoff)
        if samples or events:
            log.info(
                "retention: deleted %d samples and %d events before %s", samples, events, cutoff
            )

    async def _start(
        self, name: str, job: Callable[[], None], every_s: float, *, first_after_s: float = 0.0
    ) -> None:
        """Run ``job`` in a thread every ``every_s`` seconds until the exit stack closes."""
        rounds = self._every(name, job, every_s, first_after_s)
        await self._stack.enter_async_context(background(rounds, name))

    async def _every(
        self, name: str, job: Callable[[], None], every_s: float, first_after_s: float
    ) -> None:
        await asyncio.sleep(first_after_s)
        while True:
            try:
                if self._leads():
                    await asyncio.to_thread(job)
            except DatabaseUnavailable as exc:
                self._warn.warning(name, "%s skipped: %s", name, exc)
            except Exception:
                log.exception("%s failed", name)
            await asyncio.sleep(every_s)
