"""Enrollment tokens and what an enrollment does: pure checks, no database, the clock passed in.

A token's secret is shown once and only its SHA-256 is stored, so a leaked database
cannot enroll devices. Whether a token may still be used is a pure function of its
row and the time, so the enrollment route, the provisioning check, the listing and
their tests agree on what "expired" or "used up" means.

What an enrollment request does is decided here too (:func:`plan_enrollment`), from
the token and the devices its key and its hardware id already belong to:

- ``ENROLL``: a new device; spends a use.
- ``REPLAY``: the key is a known device's (a lost response, a re-provisioned agent):
  the same device, a new broker password; spends nothing.
- ``REFLASH``: a new key from hardware a device already runs on (the board was
  re-flashed): the same device, with its name, group, tags and history, takes the new
  key and a new broker password; spends a use, since the token is the operator's say-so.
- anything else is refused with :class:`EnrollmentRejected` and the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from fleet.errors import EnrollmentRejected

__all__ = [
    "SECRET_PREFIX",
    "UNKNOWN_TOKEN",
    "EnrolledDevice",
    "Enrollment",
    "EnrollmentAction",
    "TokenState",
    "TokenView",
    "check_token",
    "format_duration",
    "hash_secret",
    "new_admin_token",
    "new_secret",
    "new_token_id",
    "parse_duration",
    "plan_enrollment",
    "same_secret",
    "token_state",
]

SECRET_PREFIX = "eft_"  # noqa: S105  (a prefix, so leaked secrets are easy to scan for)

UNKNOWN_TOKEN = "unknown enrollment token: check it was copied whole"  # noqa: S105

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


def check_token(token: TokenView | None, now: datetime) -> None:
    """Raise :class:`EnrollmentRejected` with the reason unless ``token`` may enroll now.

    ``None`` is a secret that matches no token.
    """
    if token is None:
        raise EnrollmentRejected(UNKNOWN_TOKEN)
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


class EnrolledDevice(Protocol):
    """What the decision reads of a device row (``fleet.tables.Device``)."""

    @property
    def id(self) -> str: ...

    @property
    def token_id(self) -> str | None: ...

    @property
    def hardware_id(self) -> str | None: ...

    @property
    def revoked_at(self) -> datetime | None: ...


class EnrollmentAction(StrEnum):
    """What an accepted enrollment request does."""

    ENROLL = "enroll"
    REPLAY = "replay"
    REFLASH = "reflash"


@dataclass(frozen=True)
class Enrollment:
    """The decision: what to do, to which existing device, and whether a use is spent."""

    action: EnrollmentAction
    device_id: str | None = None  # the existing device (replay, re-flash); None: a new one

    @property
    def spends_use(self) -> bool:
        return self.action is not EnrollmentAction.REPLAY


def plan_enrollment(
    token: TokenView | None,
    now: datetime,
    *,
    hardware_id: str | None,
    by_key: EnrolledDevice | None,
    by_hardware: EnrolledDevice | None,
) -> Enrollment:
    """What a (verified) enrollment request does, or :class:`EnrollmentRejected` saying why.

    ``token`` is the token its secret names (None: none); ``by_key`` the device that
    already has its public key, ``by_hardware`` the one that already has its
    ``hardware_id`` (None when the request sends none).
    """
    if token is None:
        raise EnrollmentRejected(UNKNOWN_TOKEN)
    if by_key is not None:
        return _replay(token, now, hardware_id, by_key, by_hardware)
    if by_hardware is not None:
        if by_hardware.revoked_at is not None:
            raise EnrollmentRejected(
                f"device {by_hardware.id} with this hardware was revoked, and revoked "
                "devices stay revoked: this board cannot enroll again"
            )
        check_token(token, now)
        return Enrollment(EnrollmentAction.REFLASH, by_hardware.id)
    check_token(token, now)
    return Enrollment(EnrollmentAction.ENROLL)


def _replay(
    token: TokenView,
    now: datetime,
    hardware_id: str | None,
    device: EnrolledDevice,
    by_hardware: EnrolledDevice | None,
) -> Enrollment:
    """The key is ``device``'s: the same device again, if nothing says otherwise."""
    if device.revoked_at is not None:
        raise EnrollmentRejected(
            f"this key belongs to device {device.id}, which was revoked: "
            "a revoked device cannot enroll again with the same key"
        )
    if hardware_id is not None and device.hardware_id not in (None, hardware_id):
        # The same key on other hardware: a disk image cloned from an enrolled device.
        raise EnrollmentRejected(
            f"this key belongs to device {device.id}, which runs on other hardware: "
            "was this disk cloned from it? Remove the agent's identity to enroll this "
            "board as a device of its own"
        )
    if by_hardware is not None and by_hardware.id != device.id:
        raise EnrollmentRejected(
            f"this key belongs to device {device.id}, but this hardware to device "
            f"{by_hardware.id}: one of them was cloned; remove the agent's identity and "
            "enroll again"
        )
    if token.id != device.token_id:
        check_token(token, now)  # another token must still be valid
    return Enrollment(EnrollmentAction.REPLAY, device.id)


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
