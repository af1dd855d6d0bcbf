"""The audit log as the dashboard pages it: newest first, filtered, a page at a time.

Pages are keyed by entry id (``before`` the last one shown, or ``after`` the first),
not by offset, so a page costs the same at the log's millionth entry as at its first
and entries written meanwhile never shift what the next page shows. Read-only: the
log is written only by the services whose actions it records.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from fleet.tables import AuditEntry

__all__ = ["AuditFilter", "AuditPage", "audit_page", "subject_link"]


@dataclass(frozen=True)
class AuditFilter:
    """What to show: every field that is set must match."""

    actor: str = ""  # exactly this actor
    action: str = ""  # actions starting with this: "rollout." or "user.update"
    subject: str = ""  # exactly this subject: "rollout:ro-1a2b", "user:ada"

    @property
    def active(self) -> bool:
        return bool(self.actor or self.action or self.subject)


@dataclass(frozen=True)
class AuditPage:
    """One page of entries, newest first, and the keys of the pages around it."""

    entries: list[AuditEntry]
    older: int | None  # ``before=`` of the next page back in time; None: this is the oldest
    newer: int | None  # ``after=`` of the page forward in time; None: this is the newest


def audit_page(
    session: Session,
    wanted: AuditFilter,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> AuditPage:
    """Entries matching ``wanted``, older than ``before`` or newer than ``after``."""
    query = select(AuditEntry)
    if wanted.actor:
        query = query.where(col(AuditEntry.actor) == wanted.actor)
    if wanted.action:
        query = query.where(col(AuditEntry.action).startswith(wanted.action, autoescape=True))
    if wanted.subject:
        query = query.where(col(AuditEntry.subject) == wanted.subject)
    if after is not None:  # forward in time: the oldest entries newer than ``after``
        rows = list(
            session.exec(
                query.where(col(AuditEntry.id) > after)
                .order_by(col(AuditEntry.id))
                .limit(limit + 1)
            ).all()
        )
        more_newer = len(rows) > limit
        entries = list(reversed(rows[:limit]))
        return AuditPage(
            entries,
            older=entries[-1].id if entries else None,
            newer=entries[0].id if entries and more_newer else None,
        )
    if before is not None:
        query = query.where(col(AuditEntry.id) < before)
    rows = list(session.exec(query.order_by(col(AuditEntry.id).desc()).limit(limit + 1)).all())
    entries = rows[:limit]
    return AuditPage(
        entries,
        older=entries[-1].id if entries and len(rows) > limit else None,
        newer=entries[0].id if entries and before is not None else None,
    )


_PAGES = {
    "rollout": "/ui/rollouts/",
    "device": "/ui/devices/",
    "policy": "/ui/policies/",
}


def subject_link(subject: str) -> str | None:
    """The dashboard page of an entry's subject, when it has one."""
    kind, _, name = subject.partition(":")
    page = _PAGES.get(kind)
    return f"{page}{name}" if page and name else None
