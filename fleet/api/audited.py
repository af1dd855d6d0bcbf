"""The audit entry for a person's action through the API: who, when, what, from where."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from fleet import audit
from fleet.auth import Principal

__all__ = ["audit_action"]


def audit_action(
    session: Session,
    who: Principal,
    now: datetime,
    action: str,
    subject: str,
    reason: str = "",
    **data: Any,
) -> None:
    """Add the entry to the caller's transaction (commit it with the change it explains)."""
    audit.record(
        session,
        at=now,
        actor=who.name,
        action=action,
        subject=subject,
        reason=reason,
        data=data,
        source=who.source,
    )
