"""What the rules decide on, read inside the round's transaction: one reader per rule.

Each reader returns the plain values its pure rule takes. Every query is bounded by
an index or by the rule's window: devices by their primary key scan (every rule that
looks at devices needs them all), rollouts by status, gate checks and audit entries
by rollout, drop events by device and time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from fleet.alerts.offline import DevicePresence
from fleet.alerts.rollouts import Abort, GateFailure, RolloutTrouble, rollout_subject
from fleet.alerts.spool import DropReport
from fleet.db import in_chunks
from fleet.degraded import is_degraded
from fleet.degraded.rules import GroupHealth, counts_toward, degraded_of, group_health
from fleet.rollout.plan import LIVE, RolloutStatus
from fleet.tables import Alert, AuditEntry, Device, EventRow, GateCheckRow, Rollout, as_utc
from models.wire import DegradedModel, EventKind

__all__ = [
    "CLOCK_SKEW",
    "DropFacts",
    "covered",
    "drop_facts",
    "groups_health",
    "open_rows",
    "presence",
    "troubles",
]

CLOCK_SKEW = timedelta(days=1)  # how far a device's clock may be off, for index bounds
_FAILED = ("fail", "abort")  # GateCheckRow.decision of a failed check


def open_rows(session: Session, kind: str) -> dict[int, Alert]:
    """The open alerts of one kind, by id."""
    query = select(Alert).where(col(Alert.kind) == kind, col(Alert.cleared_at).is_(None))
    return {row.id: row for row in session.exec(query).all() if row.id is not None}


def presence(session: Session) -> list[DevicePresence]:
    """Every device that is not revoked, with what says whether it is online."""
    query = sa.select(
        col(Device.id),
        col(Device.name),
        col(Device.group),
        col(Device.online),
        col(Device.last_seen),
        col(Device.enrolled_at),
    ).where(col(Device.revoked_at).is_(None))
    return [
        DevicePresence(i, name, group, online, as_utc(seen), as_utc(enrolled) or enrolled)
        for i, name, group, online, seen, enrolled in session.execute(query).all()
    ]


def groups_health(session: Session, now: datetime, seen_within_s: float) -> list[GroupHealth]:
    """Every group with devices that count, and its degraded ones (fleet.degraded.rules)."""
    query = select(
        col(Device.id), col(Device.group), col(Device.online), col(Device.last_seen)
    ).where(col(Device.revoked_at).is_(None), col(Device.group).is_not(None))
    counted: dict[str, str] = {}  # device id -> group
    for device_id, group, online, last_seen in session.exec(query).all():
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
    degraded: dict[str, dict[str, list[DegradedModel]]] = {}
    for device_id, reported in session.exec(reports).all():
        if device_id in counted:
            degraded.setdefault(counted[device_id], {})[device_id] = degraded_of(reported)
    sizes: dict[str, int] = {}
    for group in counted.values():
        sizes[group] = sizes.get(group, 0) + 1
    return [group_health(g, n, degraded.get(g, {})) for g, n in sizes.items()]


def troubles(session: Session, since: datetime) -> list[RolloutTrouble]:
    """Rollouts aborted since ``since``, or live or finished since then with failed checks."""
    recent = select(Rollout).where(
        sa.or_(
            col(Rollout.status).in_([s.value for s in LIVE]),
            col(Rollout.finished_at) >= since,
        )
    )
    rollouts = {row.id: row for row in session.exec(recent).all()}
    ids = sorted(rollouts)
    failures: dict[str, list[GateFailure]] = {}
    for chunk in in_chunks(ids):
        checks = (
            select(GateCheckRow)
            .where(
                col(GateCheckRow.rollout_id).in_(chunk),
                col(GateCheckRow.at) >= since,
                col(GateCheckRow.decision).in_(_FAILED),
            )
            .order_by(col(GateCheckRow.at), col(GateCheckRow.id))
        )
        for check in session.exec(checks).all():
            failures.setdefault(check.rollout_id, []).append(
                GateFailure(
                    as_utc(check.at) or check.at,
                    check.stage,
                    check.gate,
                    tuple(str(r) for r in check.reasons or ()),
                )
            )
    aborted = [
        r.id
        for r in rollouts.values()
        if r.status == RolloutStatus.ABORTED and r.finished_at is not None
    ]
    actors = _abort_actors(session, aborted)
    result = []
    for rollout_id in ids:
        row = rollouts[rollout_id]
        finished = as_utc(row.finished_at)
        abort = (
            Abort(finished, actors.get(rollout_id, "unknown"), row.reason)
            if rollout_id in aborted and finished is not None
            else None
        )
        if abort is not None or rollout_id in failures:
            found = tuple(failures.get(rollout_id, ()))
            result.append(RolloutTrouble(row.id, row.name, row.change_key, abort, found))
    return result


def _abort_actors(session: Session, rollout_ids: Iterable[str]) -> dict[str, str]:
    """Who aborted each rollout, from its ``rollout.aborted`` audit entry."""
    subjects = {rollout_subject(i): i for i in rollout_ids}
    actors: dict[str, str] = {}
    for chunk in in_chunks(sorted(subjects)):
        query = (
            select(col(AuditEntry.subject), col(AuditEntry.actor))
            .where(col(AuditEntry.subject).in_(chunk), col(AuditEntry.action) == "rollout.aborted")
            .order_by(col(AuditEntry.at), col(AuditEntry.id))
        )
        for subject, actor in session.exec(query).all():
            actors[subjects[subject]] = actor  # the latest wins
    return actors


def covered(session: Session, kind: str, subjects: Collection[str]) -> dict[str, datetime]:
    """Each subject's latest closed alert's ``data.last_at``: what was acknowledged."""
    result: dict[str, datetime] = {}
    for chunk in in_chunks(sorted(subjects)):
        query = (
            select(col(Alert.subject), col(Alert.data))
            .where(
                col(Alert.kind) == kind,
                col(Alert.subject).in_(chunk),
                col(Alert.cleared_at).is_not(None),
            )
            .order_by(col(Alert.id))
        )
        for subject, data in session.exec(query).all():
            last_at = _time((data or {}).get("last_at"))
            if last_at is not None:
                result[subject] = max(last_at, result.get(subject, last_at))
    return result


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


@dataclass
class DropFacts:
    """What :func:`fleet.alerts.spool.decide` takes: recent reports, names, totals."""

    reports: list[DropReport] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # device id -> name, if not revoked
    totals: dict[str, int] = field(default_factory=dict)  # device id -> telemetry_dropped


def _count(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def drop_facts(session: Session, since: datetime, alerted: Collection[str]) -> DropFacts:
    """Drop reports stored since ``since`` by devices that ever dropped samples.

    Only devices whose ``telemetry_dropped`` grew, and those with an open alert
    (``alerted``), are looked at; their events are found through the (device, ts)
    index, bounded by the device's clock give or take :data:`CLOCK_SKEW`, then by
    when the controller stored them.
    """
    facts = DropFacts()
    query = select(col(Device.id), col(Device.name), col(Device.telemetry_dropped)).where(
        col(Device.revoked_at).is_(None),
        sa.or_(col(Device.telemetry_dropped) > 0, col(Device.id).in_(list(alerted))),
    )
    for device_id, name, total in session.exec(query).all():
        facts.names[device_id] = name
        facts.totals[device_id] = int(total)
    for chunk in in_chunks(sorted(facts.names)):
        events = select(col(EventRow.device_id), col(EventRow.stored_at), col(EventRow.data)).where(
            col(EventRow.device_id).in_(chunk),
            col(EventRow.ts) >= since - CLOCK_SKEW,
            col(EventRow.kind) == EventKind.SPOOL_DROPPED.value,
            col(EventRow.stored_at) >= since,
        )
        for device_id, stored_at, data in session.exec(events).all():
            facts.reports.append(
                DropReport(
                    device_id,
                    as_utc(stored_at) or stored_at,
                    _count(data, "samples"),
                    _count(data, "events"),
                )
            )
    return facts
