"""How many failed sign-ins a name, or an address, may have before it must wait.

Pure: the shell (:mod:`fleet.auth.signin`) counts the failures in the database, so
every controller replica enforces the same limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["SignInLimits", "wait_before_next"]


@dataclass(frozen=True)
class SignInLimits:
    """Failures allowed within ``window``; past them, wait until the oldest leaves it."""

    per_name: int = 5  # guessing one account's password
    per_address: int = 20  # trying many accounts from one place
    window: timedelta = timedelta(minutes=5)


def wait_before_next(
    name_failures: list[datetime],
    address_failures: list[datetime],
    now: datetime,
    limits: SignInLimits,
) -> timedelta | None:
    """None when a sign-in may be tried now, else how long until it may.

    Each list holds the failure times within the window, oldest first.
    """
    waits = []
    for failures, allowed in (
        (name_failures, limits.per_name),
        (address_failures, limits.per_address),
    ):
        recent = [at for at in failures if now - at < limits.window]
        if len(recent) >= allowed:
            waits.append(recent[len(recent) - allowed] + limits.window - now)
    if not waits:
        return None
    return max(max(waits), timedelta(seconds=1))
