"""Enrollment tokens and the admin token: pure checks, no database, the clock passed in.

A token's secret is shown once and only its SHA-256 is stored, so a leaked database
cannot enroll devices. Whether a token may still be used is a pure function of its
row and the time, so the enrollment route, the listing and their tests agree on
what "expired" or "used up" means.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from fleet.errors import EnrollmentRejected

__all__ = [
    "SECRET_PREFIX",
    "TokenState",
    "TokenView",
    "check_token",
    "format_duration",
    "hash_secret",
    "new_admin_token",
    "new_secret",
    "new_token_id",
    "parse_duration",
    "same_secret",
    "token_state",
]

SECRET_PREFIX = "eft_"  # noqa: S105  (a prefix, so leaked secrets are easy to scan for)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_NEVER = {"never", "none"}


def new_secret() -> str:
    """A fresh enrollment secret: 192 random bits behind a recognisable prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def new_token_id() -> str:
    """A token's public handle, safe to show in listings and URLs."""
    return "tok-" + secrets.token_hex(6)


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the database stores (and looks a presented secret up by)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time comparison, so response timing leaks nothing about ``expected``."""
    return hmac.compare_digest(presented.encode(), expected.encode())


class TokenState(StrEnum):
    """Whether a token may enroll a device now, and if not, why."""

    ACTIVE = "active"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class TokenView:
    """The fields of a token row the checks need (all datetimes aware UTC)."""

    id: str
    uses_left: int
    expires_at: datetime | None
    revoked_at: datetime | None


def token_state(token: TokenView, now: datetime) -> TokenState:
    """Why a token can or cannot enroll a device now; revocation wins over the rest."""
    if token.revoked_at is not None:
        return TokenState.REVOKED
    if token.expires_at is not None and token.expires_at <= now:
        return TokenState.EXPIRED
    if token.uses_left <= 0:
        return TokenState.USED
    return TokenState.ACTIVE


def check_token(token: TokenView, now: datetime) -> None:
    """Raise :class:`EnrollmentRejected` with the reason unless ``token`` may enroll now."""
    state = token_state(token, now)
    if state is TokenState.REVOKED:
        raise EnrollmentRejected(f"enrollment token {token.id} was revoked")
    if state is TokenState.EXPIRED:
        assert token.expires_at is not None
        raise EnrollmentRejected(
            f"enrollment token {token.id} expired at {token.expires_at.isoformat()}: "
            "ask the fleet admin for a new one"
        )
    if state is TokenState.USED:
        raise EnrollmentRejected(
            f"enrollment token {token.id} is used up: ask the fleet admin for a new one"
        )


def parse_duration(text: str) -> timedelta | None:
    """``"30m"``, ``"24h"``, ``"7d"``, ``"2w"``, ``"90"`` (seconds) or ``"never"`` (None)."""
    if text.strip().lower() in _NEVER:
        return None
    match = _DURATION.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h, 7d or never")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """A short human form, the inverse of :func:`parse_duration` for whole units."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
