"""The audit log: who or what did what, when and why.

Every admin action on a rollout and every decision the engine takes on its own is one
row, written in the same transaction as the change it explains, so the log never
claims what did not happen nor misses what did.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from fleet.tables import AuditEntry

__all__ = ["ENGINE", "record"]

ENGINE = "controller"  # the actor of automatic decisions


def record(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    subject: str,
    reason: str = "",
    data: dict[str, Any] | None = None,
    source: str = "",
) -> None:
    """Add an entry to the caller's transaction; ``source``: where a person acted from."""
    session.add(
        AuditEntry(
            at=at,
            actor=actor,
            action=action,
            subject=subject,
            reason=reason[:2000],
            data=data or {},
            source=source[:128],
        )
    )
