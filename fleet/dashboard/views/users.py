"""Users and API tokens as the dashboard lists them; changes go through :mod:`fleet.auth`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.errors import InvalidInput
from fleet.tables import ApiToken, User, as_utc
from fleet.tokens import parse_duration

__all__ = ["MAX_TOKEN_LIFETIME", "UserRow", "api_token_state", "token_expiry", "user_rows"]

MAX_TOKEN_LIFETIME = timedelta(days=10 * 365)  # as the API's TokenCreate allows


@dataclass(frozen=True)
class UserRow:
    """A user in the admins' listing."""

    name: str
    role: str
    disabled: bool
    created_by: str
    created_at: datetime
    password_changed_at: datetime
    api_tokens: int  # not revoked (expired ones included: they say who still has one)


def user_rows(session: Session) -> list[UserRow]:
    """Every user by name, with how many API tokens each holds."""
    counts = dict(
        session.exec(
            select(ApiToken.user_id, func.count())
            .where(col(ApiToken.revoked_at).is_(None))
            .group_by(col(ApiToken.user_id))
        ).all()
    )
    return [
        UserRow(
            name=u.name,
            role=u.role,
            disabled=u.disabled,
            created_by=u.created_by,
            created_at=as_utc(u.created_at) or u.created_at,
            password_changed_at=as_utc(u.password_changed_at) or u.password_changed_at,
            api_tokens=int(counts.get(u.id or 0, 0)),
        )
        for u in session.exec(select(User).order_by(col(User.name))).all()
    ]


def token_expiry(text: str, now: datetime) -> datetime | None:
    """When a token asked to last ``text`` ("90d", "never") expires; 422 naming ``expires``."""
    try:
        duration = parse_duration(text or "never")
    except ValueError as exc:
        raise InvalidInput(str(exc), field="expires") from None
    if duration is None:
        return None
    if duration > MAX_TOKEN_LIFETIME:
        raise InvalidInput("at most ten years (or never)", field="expires")
    return now + duration


def api_token_state(row: ApiToken, now: datetime) -> str:
    """``active``, ``expired`` or ``revoked``."""
    if row.revoked_at is not None:
        return "revoked"
    expires = as_utc(row.expires_at)
    return "expired" if expires is not None and expires <= now else "active"
