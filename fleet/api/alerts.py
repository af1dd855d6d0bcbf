"""Alerts: conditions an admin should see, open until they clear (``group_degraded`` so far).

The controller raises and clears them on its own (:mod:`fleet.degraded.alerts`); this
router only reads them. Each raise and clear is also in the audit log, under the
alert's subject (``GET /api/v1/audit?subject=group:<name>``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from fleet.api.deps import Admin, SessionDep
from fleet.degraded import AlertState, list_alerts
from fleet.tables import Alert, as_utc

__all__ = ["AlertList", "AlertPublic", "router"]

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"], dependencies=[Admin])


class AlertPublic(BaseModel):
    """One alert; ``data`` holds the numbers behind its message."""

    id: int
    kind: str  # "group_degraded"
    subject: str  # "group:<name>"
    severity: str  # "info", "warning", "error"
    state: Literal["open", "cleared"]
    message: str
    data: dict[str, Any]
    raised_at: datetime
    updated_at: datetime  # its numbers last changed
    cleared_at: datetime | None


class AlertList(BaseModel):
    """Alerts, newest first."""

    items: list[AlertPublic]


def _public(row: Alert) -> AlertPublic:
    assert row.id is not None
    return AlertPublic(
        id=row.id,
        kind=row.kind,
        subject=row.subject,
        severity=row.severity,
        state="open" if row.cleared_at is None else "cleared",
        message=row.message,
        data=row.data or {},
        raised_at=as_utc(row.raised_at) or row.raised_at,
        updated_at=as_utc(row.updated_at) or row.updated_at,
        cleared_at=as_utc(row.cleared_at),
    )


@router.get("")
def get_alerts(
    session: SessionDep,
    state: Annotated[AlertState, Query(description="open: not cleared; all: cleared too")] = "open",
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> AlertList:
    """The open alerts (or all of them), newest first."""
    return AlertList(items=[_public(row) for row in list_alerts(session, state, limit)])
