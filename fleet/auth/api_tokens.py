"""Users' API tokens, for the CLI and scripts: shown once, stored as SHA-256, revocable.

A token acts with its user's current role, so demoting or disabling a user takes
effect on their tokens at once.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlmodel import Session, col, select

from fleet import audit
from fleet.errors import NotFound
from fleet.tables import ApiToken, User, as_utc
from fleet.tokens import hash_secret

__all__ = ["TOKEN_PREFIX", "create_token", "list_tokens", "resolve_token", "revoke_token"]

TOKEN_PREFIX = "efu_"  # noqa: S105  (a prefix, so leaked tokens are easy to scan for)
_TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per token


def create_token(
    session: Session,
    user: User,
    *,
    name: str,
    expires_at: datetime | None,
    actor: str,
    source: str,
    now: datetime,
) -> tuple[ApiToken, str]:
    """A new token for ``user`` in the caller's transaction, and its secret (shown once)."""
    assert user.id is not None
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        user_id=user.id,
        name=name,
        secret_sha256=hash_secret(secret),
        created_at=now,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        at=now,
        actor=actor,
        action="api_token.create",
        subject=f"user:{user.name}",
        source=source,
        data={"token": row.id, "name": name, "expires_at": expires_at and expires_at.isoformat()},
    )
    return row, secret


def resolve_token(session: Session, secret: str, now: datetime) -> User | None:
    """The enabled user a live token belongs to, or None; notes when it was last used."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    row = session.exec(
        select(ApiToken).where(ApiToken.secret_sha256 == hash_secret(secret))
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= now:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    used = as_utc(row.last_used_at)
    if used is None or (now - used).total_seconds() >= _TOUCH_EVERY_S:
        row.last_used_at = now
        session.add(row)
        session.commit()
    return user


def list_tokens(session: Session, user: User | None) -> list[tuple[ApiToken, str]]:
    """Tokens with their user's name, newest first; ``user`` None: everyone's."""
    query = select(ApiToken, User.name).join(User, col(User.id) == col(ApiToken.user_id))
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return [(row, name) for row, name in session.exec(query.order_by(col(ApiToken.id).desc()))]


def revoke_token(
    session: Session, token_id: int, *, owner: User | None, actor: str, source: str, now: datetime
) -> ApiToken:
    """Revoke a token (``owner`` set: only one of theirs); revoking twice changes nothing."""
    row = session.get(ApiToken, token_id)
    if row is None or (owner is not None and row.user_id != owner.id):
        raise NotFound(f"no API token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
        user = session.get(User, row.user_id)
        audit.record(
            session,
            at=now,
            actor=actor,
            action="api_token.revoke",
            subject=f"user:{user.name if user else row.user_id}",
            source=source,
            data={"token": token_id, "name": row.name},
        )
    return row
