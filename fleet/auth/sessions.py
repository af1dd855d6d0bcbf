"""Browser sessions: a random secret in an HttpOnly cookie, its SHA-256 in the database.

Signing out, or an admin changing the user, revokes the row, so a copied cookie is
dead everywhere at once; sessions also end after ``idle`` without a request and after
``lifetime`` in any case. Each session has its own CSRF token, which every form and
htmx request must send back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from fleet.tables import User, WebSession, as_utc
from fleet.tokens import hash_secret

__all__ = ["SessionLimits", "open_session", "resolve_session", "revoke_session"]

_TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often


@dataclass(frozen=True)
class SessionLimits:
    """When a session ends without signing out."""

    idle: timedelta = timedelta(hours=8)  # without a request
    lifetime: timedelta = timedelta(days=7)  # from sign-in, whatever happens


def open_session(
    session: Session, user: User, *, address: str, now: datetime, limits: SessionLimits
) -> tuple[WebSession, str]:
    """A new session row in the caller's transaction, and the cookie's secret."""
    assert user.id is not None
    secret = secrets.token_urlsafe(32)
    row = WebSession(
        id=hash_secret(secret),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        source=address[:64],
        created_at=now,
        last_seen_at=now,
        expires_at=now + limits.lifetime,
    )
    session.add(row)
    return row, secret


def resolve_session(
    session: Session, secret: str, *, now: datetime, limits: SessionLimits
) -> tuple[WebSession, User] | None:
    """The live session a cookie names and its enabled user, or None."""
    if not secret or len(secret) > 128:
        return None
    row = session.get(WebSession, hash_secret(secret))
    if row is None or row.revoked_at is not None:
        return None
    expires = as_utc(row.expires_at) or now
    seen = as_utc(row.last_seen_at) or now
    if now >= expires or now - seen >= limits.idle:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    if now - seen >= _TOUCH_EVERY:
        row.last_seen_at = now
        session.add(row)
        session.commit()
    return row, user


def revoke_session(session: Session, row: WebSession, now: datetime) -> None:
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
