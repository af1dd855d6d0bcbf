"""The link's database work: batch writes, presence, retention, and the reads it needs.

Every function here blocks and takes the SQLAlchemy engine; the link runs them in
worker threads, never on the event loop. :func:`write_batch` stores a batch of
accepted messages in one transaction: telemetry samples and events with
``INSERT ... ON CONFLICT DO NOTHING`` (so a replayed message is stored once and
counted as a duplicate), then one executemany ``UPDATE`` each for presence, reported
state and dropped-sample counters. A transient database error (connection lost,
database locked) is raised as :class:`~fleet.errors.DatabaseUnavailable` for the
caller to retry the whole batch; a permanent one (a value the database refuses) is
isolated by splitting the batch, so one bad message never blocks the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import SQLModel

from fleet.db import is_transient, unavailable
from fleet.errors import ConfigError
from fleet.link.broker_auth import DeviceCredential
from fleet.link.ingest import Accepted, event_row, presence_after, telemetry_rows
from fleet.tables import Device, EventRow, TelemetryRow
from models.wire import Event, ReportedState, TelemetryBatch

__all__ = [
    "SUPPORTED_DIALECTS",
    "WriteResult",
    "check_dialect",
    "load_credentials",
    "load_desired",
    "mark_offline",
    "prune",
    "write_batch",
]

log = logging.getLogger(__name__)

SUPPORTED_DIALECTS = ("sqlite", "postgresql")

_devices: sa.Table = SQLModel.metadata.tables[str(Device.__tablename__)]
_telemetry: sa.Table = SQLModel.metadata.tables[str(TelemetryRow.__tablename__)]
_events: sa.Table = SQLModel.metadata.tables[str(EventRow.__tablename__)]


@dataclass
class WriteResult:
    """What one batch write did."""

    stored: int = 0  # telemetry samples and events inserted
    duplicates: int = 0  # samples and events already stored (or twice in the batch)
    failed: list[tuple[Accepted, str]] = field(default_factory=list)  # refused for good


def check_dialect(engine: sa.Engine) -> None:
    if engine.dialect.name not in SUPPORTED_DIALECTS:
        raise ConfigError(
            f"the fleet link supports SQLite and PostgreSQL, not {engine.dialect.name}"
        )


def load_credentials(engine: sa.Engine) -> list[DeviceCredential]:
    """Every device's broker login, revoked ones flagged."""
    devices = _devices.c
    query = sa.select(
        devices.id, devices.mqtt_password_hash, devices.revoked_at, devices.mqtt_password_bcrypt
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        raise
    return [DeviceCredential(row[0], row[1], row[2] is not None, row[3]) for row in rows]


def load_desired(engine: sa.Engine) -> list[tuple[str, dict[str, Any]]]:
    """``(device id, stored desired state)`` of every non-revoked device that has one."""
    query = sa.select(_devices.c.id, _devices.c.desired).where(
        _devices.c.revoked_at.is_(None), _devices.c.desired_version > 0
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        raise
    # A JSON column stores Python None as JSON null, which is not SQL NULL: filter here.
    return [(row[0], row[1]) for row in rows if isinstance(row[1], dict) and row[1]]


def _insert(engine: sa.Engine, table: sa.Table, key: tuple[str, str]) -> Any:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return (
        dialect.insert(table)
        .on_conflict_do_nothing(index_elements=list(key))
        .returning(table.c[key[0]], table.c[key[1]])
    )


_SET_PRESENCE = (
    sa.update(_devices)
    .where(_devices.c.id == sa.bindparam("b_id"))
    .values(last_seen=sa.bindparam("b_seen"), online=sa.bindparam("b_online"))
)
# A report is ordered by the device's clock, which is trusted when it is within
# CLOCK_SKEW of the controller's as the report arrives. A report never overwrites a
# newer one (replicas sharing ingest commit in any order; a retained copy is re-read
# after a restart), unless the stored one is dated beyond CLOCK_SKEW in the future: that
# device's clock was wrong and is now corrected. A live report from a device whose clock
# is off (an RTC reset) cannot be ordered, and wins as it arrives.
CLOCK_SKEW = timedelta(minutes=10)
_SET_REPORTED = (
    sa.update(_devices)
    .where(_devices.c.id == sa.bindparam("b_id"))
    .values(
        reported=sa.bindparam("b_reported"),
        reported_at=sa.bindparam("b_at"),
        agent_version=sa.bindparam("b_agent"),
    )
)
_SET_REPORTED_IF_NEWER = _SET_REPORTED.where(
    sa.or_(
        _devices.c.reported_at.is_(None),
        _devices.c.reported_at <= sa.bindparam("b_at"),
        _devices.c.reported_at > sa.bindparam("b_future"),
    )
)
_ADD_DROPPED = (
    sa.update(_devices)
    .where(_devices.c.id == sa.bindparam("b_id"))
    .values(telemetry_dropped=_devices.c.telemetry_dropped + sa.bindparam("b_n"))
)


def _write(
    conn: sa.Connection, engine: sa.Engine, items: Sequence[Accepted], now: datetime
) -> WriteResult:
    result = WriteResult()
    telemetry: dict[tuple[str, str], dict[str, Any]] = {}
    batches: list[tuple[TelemetryBatch, list[tuple[str, str]]]] = []
    events: dict[tuple[str, str], dict[str, Any]] = {}
    presence: dict[str, dict[str, Any]] = {}
    reported: dict[str, Accepted] = {}  # device -> its report to store
    for item in items:
        message = item.message
        if isinstance(message, TelemetryBatch):
            keys = []
            for row in telemetry_rows(message, now):
                key = (row["device_id"], row["sample_id"])
                if key in telemetry:
                    result.duplicates += 1
                    continue
                telemetry[key] = row
                keys.append(key)
            if message.dropped:
                batches.append((message, keys))
        elif isinstance(message, Event):
            key = (message.device_id, message.id)
            if key in events:
                result.duplicates += 1
            else:
                events[key] = event_row(message, now)
        elif isinstance(message, ReportedState):
            # The latest live report wins; a retained copy only fills in when no live
            # report came, and then only if it is newer than what is stored.
            previous = reported.get(item.device_id)
            if not item.retained or previous is None or _newer_retained(item, previous):
                reported[item.device_id] = item
        online = presence_after(item)
        if online is not None:
            presence[item.device_id] = {
                "b_id": item.device_id,
                "b_seen": item.received_at,
                "b_online": online,
            }

    inserted: set[tuple[str, str]] = set()
    if telemetry:
        stmt = _insert(engine, _telemetry, ("device_id", "sample_id"))
        inserted = {(row[0], row[1]) for row in conn.execute(stmt, list(telemetry.values()))}
        result.stored += len(inserted)
        result.duplicates += len(telemetry) - len(inserted)
    if events:
        stmt = _insert(engine, _events, ("device_id", "event_id"))
        new_events = conn.execute(stmt, list(events.values())).all()
        result.stored += len(new_events)
        result.duplicates += len(events) - len(new_events)
    # Device rows are written in id order, as every bulk writer of devices does, so two
    # transactions never wait on each other's rows in opposite orders (a deadlock).
    if presence:
        conn.execute(_SET_PRESENCE, [presence[d] for d in sorted(presence)])
    ordered: list[dict[str, Any]] = []
    unordered: list[dict[str, Any]] = []
    for device_id, item in sorted(reported.items()):
        state = item.message
        assert isinstance(state, ReportedState)
        params = {
            "b_id": device_id,
            "b_reported": state.model_dump(mode="json", exclude_none=True),
            "b_at": state.reported_at.astimezone(UTC),
            "b_agent": state.agent_version,
            "b_future": item.received_at.astimezone(UTC) + CLOCK_SKEW,
        }
        off_clock = abs(state.reported_at - item.received_at) > CLOCK_SKEW
        (unordered if off_clock and not item.retained else ordered).append(params)
    if ordered:
        conn.execute(_SET_REPORTED_IF_NEWER, ordered)
    if unordered:
        conn.execute(_SET_REPORTED, unordered)
    # Samples the agent's spool lost count once: only for a batch stored for the first time.
    dropped: dict[str, int] = {}
    for batch, keys in batches:
        if any(key in inserted for key in keys):
            dropped[batch.device_id] = dropped.get(batch.device_id, 0) + batch.dropped
    if dropped:
        conn.execute(_ADD_DROPPED, [{"b_id": k, "b_n": n} for k, n in dropped.items()])
    return result


def _newer_retained(item: Accepted, previous: Accepted) -> bool:
    """A retained report dated after the retained one ``previous`` (never after a live one)."""
    assert isinstance(item.message, ReportedState)
    assert isinstance(previous.message, ReportedState)
    return previous.retained and previous.message.reported_at <= item.message.reported_at


def write_batch(
    engine: sa.Engine, items: Sequence[Accepted], now: datetime | None = None
) -> WriteResult:
    """Store ``items`` in one transaction (split in two on a permanent error, recursively).

    Raises :class:`DatabaseUnavailable` when the database cannot be reached or is
    locked; the caller retries the same items later, and what was committed before
    the error is then found as duplicates, never stored twice.
    """
    stored_at = (now or datetime.now(UTC)).astimezone(UTC)
    try:
        with engine.begin() as conn:
            return _write(conn, engine, items, stored_at)
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        if len(items) == 1:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            return WriteResult(
                failed=[(items[0], detail[0][:300] if detail else type(exc).__name__)]
            )
        half = len(items) // 2
        first = write_batch(engine, items[:half], stored_at)
        second = write_batch(engine, items[half:], stored_at)
        return WriteResult(
            first.stored + second.stored,
            first.duplicates + second.duplicates,
            first.failed + second.failed,
        )


def mark_offline(engine: sa.Engine, cutoff: datetime) -> int:
    """Set ``online`` False for devices not seen since ``cutoff``; the number changed."""
    stmt = (
        sa.update(_devices)
        .where(
            _devices.c.online == sa.true(),
            sa.or_(_devices.c.last_seen.is_(None), _devices.c.last_seen < cutoff.astimezone(UTC)),
        )
        .values(online=False)
    )
    try:
        with engine.begin() as conn:
            return int(conn.execute(stmt).rowcount)
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        raise


def prune(engine: sa.Engine, cutoff: datetime) -> tuple[int, int]:
    """Delete telemetry samples and events older than ``cutoff``; how many of each.

    Sign-in attempts and sessions that ended before ``cutoff`` go too: they only matter
    while recent.
    """
    cutoff = cutoff.astimezone(UTC)
    attempts = SQLModel.metadata.tables["login_attempts"]
    sessions = SQLModel.metadata.tables["web_sessions"]
    try:
        with engine.begin() as conn:
            samples = conn.execute(sa.delete(_telemetry).where(_telemetry.c.ts < cutoff)).rowcount
            events = conn.execute(sa.delete(_events).where(_events.c.ts < cutoff)).rowcount
            conn.execute(sa.delete(attempts).where(attempts.c.at < cutoff))
            ended = sa.or_(sessions.c.expires_at < cutoff, sessions.c.revoked_at < cutoff)
            conn.execute(sa.delete(sessions).where(ended))
    except sa_exc.SQLAlchemyError as exc:
        if is_transient(exc):
            raise unavailable(exc) from exc
        raise
    return int(samples), int(events)
