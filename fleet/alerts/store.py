"""Alerts as admins read and acknowledge them.

An acknowledgement records who saw the alert and when (``acknowledged_at``,
``acknowledged_by``), audited as ``alert.acknowledged`` under the alert's subject and
posted to the webhook. An event alert (``rollout_failed``) is then cleared: nothing
else would ever clear it. A condition alert stays open until its condition clears;
acknowledging it again changes nothing. Acknowledging a cleared alert is a conflict.
It takes the alert lock (waiting), so it never races a round deciding on the alert.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlmodel import Session, col, select

from fleet.alerts.lock import lock_alerts
from fleet.alerts.params import EVENT_KINDS, RuleKind
from fleet.alerts.webhook import configured, enqueue
from fleet.audit import record
from fleet.errors import Conflict, NotFound
from fleet.tables import Alert

__all__ = ["AlertState", "acknowledge", "is_event", "list_alerts"]

AlertState = Literal["open", "all"]


def is_event(kind: str) -> bool:
    """Whether alerts of ``kind`` are events (cleared by an acknowledgement)."""
    return kind in {k.value for k in EVENT_KINDS}


def list_alerts(
    session: Session,
    state: AlertState = "open",
    limit: int = 200,
    kind: RuleKind | None = None,
) -> list[Alert]:
    """Alerts, newest first: the open ones, or every one (cleared too); of one kind, or all."""
    query = select(Alert).order_by(col(Alert.raised_at).desc(), col(Alert.id).desc())
    if state == "open":
        query = query.where(col(Alert.cleared_at).is_(None))
    if kind is not None:
        query = query.where(col(Alert.kind) == kind.value)
    return list(session.exec(query.limit(limit)).all())


def acknowledge(
    session: Session, alert_id: int, *, actor: str, now: datetime, source: str = ""
) -> Alert:
    """Acknowledge an open alert (module docstring); ``NotFound``, or ``Conflict`` if cleared."""
    lock_alerts(session, wait=True)
    row = session.get(Alert, alert_id)
    if row is None:
        raise NotFound(f"no alert {alert_id}")
    if row.cleared_at is not None:
        raise Conflict(f"alert {alert_id} is cleared already")
    if row.acknowledged_at is not None:
        return row
    event = is_event(row.kind)
    row.acknowledged_at, row.acknowledged_by, row.updated_at = now, actor, now
    if event:
        row.cleared_at = now
    session.add(row)
    record(
        session,
        at=now,
        actor=actor,
        action="alert.acknowledged",
        source=source,
        subject=row.subject,
        reason="acknowledged and cleared" if event else "acknowledged; open while it holds",
        data={"alert": alert_id, "kind": row.kind, "cleared": event},
    )
    if configured(session):
        enqueue(session, row, "acknowledged", now)
    session.commit()
    return row
