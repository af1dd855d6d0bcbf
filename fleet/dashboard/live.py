"""Live updates: what changed in the database, pushed to open pages as server-sent events.

One poller per controller process asks the database every ``interval_s`` what changed
since its last look (device reports and heartbeats, rollouts, alerts) and tells each
open page the topics it asked for; the page then fetches the fragments it shows.
Reading the database, not one process's memory, means a page sees changes made
through any controller replica. The poller runs only while some page listens.

Topics: ``devices`` and ``device-<id>``; ``rollouts`` and ``rollout-<id>``; ``alerts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from fleet.tables import Alert, Device, Rollout

__all__ = ["Changes", "LiveFeed", "read_changes", "topics_of"]

log = logging.getLogger(__name__)
_OVERLAP = timedelta(seconds=2)  # look back a little: commits land out of timestamp order


@dataclass(frozen=True)
class Changes:
    """What changed since the last look."""

    devices: frozenset[str] = frozenset()
    rollouts: frozenset[str] = frozenset()
    alerts: bool = False


def topics_of(changes: Changes) -> set[str]:
    topics = {f"device-{d}" for d in changes.devices} | {f"rollout-{r}" for r in changes.rollouts}
    if changes.devices:
        topics.add("devices")
    if changes.rollouts:
        topics.add("rollouts")
    if changes.alerts:
        topics.add("alerts")
    return topics


def read_changes(engine: Engine, since: datetime) -> Changes:
    """Rows touched after ``since`` (minus an overlap, so a late commit is not missed)."""
    after = since - _OVERLAP
    with engine.connect() as db:
        devices = db.execute(
            sa.select(col(Device.id)).where(
                sa.or_(col(Device.reported_at) > after, col(Device.last_seen) > after)
            )
        ).scalars()
        rollouts = db.execute(
            sa.select(col(Rollout.id)).where(col(Rollout.updated_at) > after)
        ).scalars()
        alerts = db.execute(
            sa.select(sa.func.count()).select_from(Alert).where(col(Alert.updated_at) > after)
        ).scalar_one()
        return Changes(frozenset(devices), frozenset(rollouts), bool(alerts))


@dataclass
class _Listener:
    topics: frozenset[str]
    queue: asyncio.Queue[set[str]] = field(default_factory=lambda: asyncio.Queue(maxsize=8))


class LiveFeed:
    """Fans database changes out to listening pages; polls only while one listens."""

    def __init__(
        self, engine: Engine, clock: Callable[[], datetime], interval_s: float = 0.5
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._interval_s = interval_s
        self._listeners: list[_Listener] = []
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def listen(self, topics: Iterable[str]) -> AsyncIterator[asyncio.Queue[set[str]]]:
        """A queue of topic sets that changed, for as long as the caller listens."""
        listener = _Listener(frozenset(topics))
        self._listeners.append(listener)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="dashboard-live")
        try:
            yield listener.queue
        finally:
            self._listeners.remove(listener)
            if not self._listeners and self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None

    async def _poll(self) -> None:
        since = self._clock()
        while True:
            await asyncio.sleep(self._interval_s)
            now = self._clock()
            try:
                changes = await asyncio.to_thread(read_changes, self._engine, since)
            except Exception:
                log.exception("cannot read the dashboard's live changes; retrying")
                continue
            since = now
            self._publish(topics_of(changes))

    def _publish(self, topics: set[str]) -> None:
        if not topics:
            return
        for listener in self._listeners:
            wanted = topics & listener.topics
            if not wanted:
                continue
            with contextlib.suppress(asyncio.QueueFull):  # a slow page catches up next time
                listener.queue.put_nowait(wanted)
