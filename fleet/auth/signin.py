"""Signing in with a name and password, rate-limited per name and per address.

Every attempt is a row (:class:`fleet.tables.LoginAttempt`), so the limit holds across
controller replicas and an admin can see who tried. A failure never says whether the
name exists.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlmodel import Session, col, select

from fleet.auth.limits import SignInLimits, wait_before_next
from fleet.auth.passwords import hash_password, needs_rehash, verify
from fleet.errors import RateLimited, Unauthorized
from fleet.tables import LoginAttempt, User, as_utc

__all__ = ["sign_in"]


def _failures(session: Session, column: str, value: str, since: datetime) -> list[datetime]:
    field = col(getattr(LoginAttempt, column))
    rows = session.exec(
        select(LoginAttempt.at)
        .where(field == value, col(LoginAttempt.ok).is_(False), col(LoginAttempt.at) > since)
        .order_by(col(LoginAttempt.at))
    )
    return [as_utc(at) or at for at in rows]


def sign_in(
    session: Session,
    name: str,
    password: str,
    *,
    address: str,
    now: datetime,
    limits: SignInLimits,
) -> User:
    """The user, if the password is right and the limits allow; commits the attempt.

    Raises ``RateLimited`` before checking anything when too many recent attempts
    failed, and ``Unauthorized`` for a wrong name, password or a disabled user.
    """
    name = name.strip().lower()[:64]
    address = address[:64]
    since = now - limits.window
    wait = wait_before_next(
        _failures(session, "name", name, since),
        _failures(session, "source", address, since),
        now,
        limits,
    )
    if wait is not None:
        seconds = math.ceil(wait.total_seconds())
        raise RateLimited(
            f"too many failed sign-ins: try again in {seconds} s", retry_after_s=seconds
        )
    user = session.exec(select(User).where(User.name == name)).first()
    ok = verify(user.password_hash if user else None, password) and user is not None
    ok = ok and user is not None and not user.disabled
    session.add(LoginAttempt(at=now, name=name, source=address, ok=ok))
    if ok and user is not None and needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
        session.add(user)
    session.commit()
    if not ok or user is None:
        raise Unauthorized("wrong name or password", challenge='FormBased realm="edgefleet"')
    return user
