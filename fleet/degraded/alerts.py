"""The alert shell: read the groups' health, apply :func:`fleet.degraded.rules.decide`, write.

:func:`evaluate` runs one round in one transaction: it reads every grouped device's
presence, the reports of the degraded ones and the open ``group_degraded`` alerts,
decides, and writes the alerts with an audit entry for each raise and clear
(``alert.raised``, ``alert.cleared``; actor ``controller``, subject ``group:<name>``).
An update of an open alert's numbers is not audited: the alert row shows it.

Several controller replicas may evaluate at once, and there must never be two open
alerts for one subject. Each round first takes a lock, then reads, so its re-check of
the open alerts sees every alert another replica committed: on PostgreSQL a
transaction-scoped advisory lock, tried without waiting (a replica that finds it
taken skips the round: the other does the same work); on SQLite the database's write
lock, taken by a write that changes nothing (the next round waits for it).

:func:`watch` runs a round every ``degraded_alert_interval_s`` in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from fleet.audit import ENGINE, record
from fleet.config import FleetSettings
from fleet.degraded.rules import (
    GROUP_DEGRADED,
    Clear,
    OpenAlert,
    Raise,
    Thresholds,
    Update,
    counts_toward,
    decide,
    degraded_of,
    group_health,
    group_subject,
)
from fleet.tables import Alert, Device, as_utc
from models.wire import DegradedModel

__all__ = [
    "AlertState",
    "Evaluation",
    "evaluate",
    "is_degraded",
    "list_alerts",
    "thresholds_of",
    "watch",
]

log = logging.getLogger(__name__)

AlertState = Literal["open", "all"]
_ALERT_LOCK = 0x45_46_41_4C  # "EFAL": pg_try_advisory_xact_lock key of an evaluation round
_devices: sa.Table = SQLModel.metadata.tables[str(Device.__tablename__)]


def is_degraded() -> sa.ColumnElement[bool]:
    """SQL: the device's last report lists at least one degraded model (SQLite, PostgreSQL)."""
    listed = _devices.c.reported["degraded"].as_json()
    return sa.func.coalesce(sa.func.json_array_length(listed), 0) > 0


@dataclass
class Evaluation:
    """What one round changed: the subjects of the alerts raised, updated and cleared."""

    raised: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)


def _serialize(session: Session) -> bool:
    """Take the round's lock; False when another replica holds it (PostgreSQL only)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        taken = conn.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _ALERT_LOCK}
        ).scalar()
        return bool(taken)
    conn.execute(sa.text("UPDATE alerts SET id = id WHERE 0 = 1"))  # SQLite's write lock
    return True


def evaluate(
    engine: sa.Engine,
    thresholds: Thresholds,
    *,
    now: datetime,
    seen_within_s: float,
    groups: Collection[str] | None = None,
) -> Evaluation | None:
    """One round over every group (or only ``groups``); None when another replica ran it."""
    with Session(engine, expire_on_commit=False) as session:
        if not _serialize(session):
            return None
        presence = select(
            col(Device.id), col(Device.group), col(Device.online), col(Device.last_seen)
        ).where(col(Device.revoked_at).is_(None), col(Device.group).is_not(None))
        if groups is not None:
            presence = presence.where(col(Device.group).in_(list(groups)))
        counted: dict[str, str] = {}  # device id -> group
        for device_id, group, online, last_seen in session.exec(presence).all():
            if group is not None and counts_toward(
                revoked=False,
                online=online,
                last_seen=as_utc(last_seen),
                now=now,
                seen_within_s=seen_within_s,
            ):
                counted[device_id] = group
        reports = select(col(Device.id), col(Device.reported)).where(
            col(Device.revoked_at).is_(None), col(Device.group).is_not(None), is_degraded()
        )
        if groups is not None:
            reports = reports.where(col(Device.group).in_(list(groups)))
        degraded: dict[str, dict[str, list[DegradedModel]]] = {}
        for device_id, reported in session.exec(reports).all():
            if device_id in counted:
                degraded.setdefault(counted[device_id], {})[device_id] = degraded_of(reported)
        sizes: dict[str, int] = {}
        for group in counted.values():
            sizes[group] = sizes.get(group, 0) + 1
        health = [group_health(g, n, degraded.get(g, {})) for g, n in sizes.items()]

        query = select(Alert).where(
            col(Alert.kind) == GROUP_DEGRADED, col(Alert.cleared_at).is_(None)
        )
        if groups is not None:
            query = query.where(col(Alert.subject).in_([group_subject(g) for g in groups]))
        rows = {row.id: row for row in session.exec(query).all() if row.id is not None}
        opened = [OpenAlert(i, r.subject, r.message, r.data or {}) for i, r in rows.items()]

        result = Evaluation()
        actions = decide(health, opened, thresholds)
        for action in actions:
            if isinstance(action, Raise):
                alert = Alert(
                    kind=GROUP_DEGRADED,
                    subject=action.subject,
                    severity=action.severity.value,
                    message=action.message,
                    data=action.data,
                    raised_at=now,
                    updated_at=now,
                )
                session.add(alert)
                session.flush()
                record(
                    session,
                    at=now,
                    actor=ENGINE,
                    action="alert.raised",
                    subject=action.subject,
                    reason=action.message,
                    data={"alert": alert.id, "kind": GROUP_DEGRADED, **action.data},
                )
                result.raised.append(action.subject)
            elif isinstance(action, Update):
                row = rows[action.alert_id]
                row.message, row.data, row.updated_at = action.message, action.data, now
                session.add(row)
                result.updated.append(action.subject)
            elif isinstance(action, Clear):
                row = rows[action.alert_id]
                row.cleared_at, row.updated_at = now, now
                session.add(row)
                record(
                    session,
                    at=now,
                    actor=ENGINE,
                    action="alert.cleared",
                    subject=action.subject,
                    reason=action.reason,
                    data={"alert": action.alert_id, "kind": GROUP_DEGRADED},
                )
                result.cleared.append(action.subject)
        session.commit()
    for action in actions:
        if isinstance(action, Raise):
            log.warning("alert raised for %s: %s", action.subject, action.message)
        elif isinstance(action, Clear):
            log.info("alert cleared for %s: %s", action.subject, action.reason)
    return result


def list_alerts(session: Session, state: AlertState = "open", limit: int = 200) -> list[Alert]:
    """Alerts, newest first: the open ones, or every one (cleared too)."""
    query = select(Alert).order_by(col(Alert.raised_at).desc(), col(Alert.id).desc())
    if state == "open":
        query = query.where(col(Alert.cleared_at).is_(None))
    return list(session.exec(query.limit(limit)).all())


def thresholds_of(settings: FleetSettings) -> Thresholds:
    return Thresholds(settings.degraded_alert_share, settings.degraded_alert_min_devices)


async def watch(engine: sa.Engine, settings: FleetSettings, clock: Callable[[], datetime]) -> None:
    """Evaluate every ``degraded_alert_interval_s`` until cancelled; a failed round is logged."""
    thresholds = thresholds_of(settings)
    while True:
        await asyncio.sleep(settings.degraded_alert_interval_s)
        try:
            result = await asyncio.to_thread(
                evaluate,
                engine,
                thresholds,
                now=clock(),
                seen_within_s=settings.degraded_alert_seen_within_s,
            )
        except Exception:
            log.exception("cannot evaluate the degraded-device alerts")
            continue
        if result is None:
            log.debug("another controller evaluated the degraded-device alerts")
