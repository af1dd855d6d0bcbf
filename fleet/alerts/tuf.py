"""``tuf_expiry``: TUF metadata close to expiry, before devices stop trusting it. Pure.

Devices refuse every update once a role's metadata has expired, so each top-level
role (root, targets, snapshot, timestamp) has a threshold in days
(:class:`fleet.alerts.params.TufExpiryParams`). A role expiring within its threshold,
or already expired, has an open alert (subject ``tuf:<role>``, severity error); it
clears once the role is re-signed with a later expiry. The shell reads the expiries
from the repository (``TufRepository.status``) and hands them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from pydantic import JsonValue

from fleet.alerts.conditions import Finding, reconcile, stamp
from fleet.alerts.params import TufExpiryParams
from fleet.degraded.rules import Action, OpenAlert
from models.wire import Severity

__all__ = ["decide", "span", "tuf_subject"]

_PREFIX = "tuf:"
_OFFLINE_CAPABLE = ("root", "targets")  # their keys may be offline: a person must sign


def tuf_subject(role: str) -> str:
    return f"{_PREFIX}{role}"


def span(days: float) -> str:
    """'6 h', '2 days', '1 day': a threshold for people."""
    if days < 1:
        return f"{days * 24:g} h"
    return f"{days:g} day" + ("" if days == 1 else "s")


def _what_to_do(role: str) -> str:
    if role in _OFFLINE_CAPABLE:
        return "re-sign it (with offline keys: `edgefleet keys staged`, sign, import)"
    return "the controller re-signs it on its own: see why its renewal fails in its log"


def _finding(role: str, expires: datetime, days: float, now: datetime) -> Finding:
    if expires <= now:
        text = (
            f"TUF {role} metadata expired at {stamp(expires)}: devices refuse updates "
            f"until it is re-signed; {_what_to_do(role)}"
        )
    else:
        text = (
            f"TUF {role} metadata expires at {stamp(expires)}, within {span(days)}; "
            f"{_what_to_do(role)}"
        )
    data: dict[str, JsonValue] = {
        "role": role,
        "expires": expires.isoformat(),
        "days": days,
        "expired": expires <= now,
    }
    return Finding(tuf_subject(role), text, data)


def decide(
    expiries: Mapping[str, datetime],
    open_alerts: Iterable[OpenAlert],
    params: TufExpiryParams,
    now: datetime,
) -> list[Action]:
    """Raise, update and clear ``tuf_expiry`` alerts from each role's ``expires``."""
    findings = []
    for role, expires in sorted(expiries.items()):
        days = params.days(role)
        if days is not None and expires - now <= timedelta(days=days):
            findings.append(_finding(role, expires, days, now))

    def gone(subject: str) -> str:
        role = subject.removeprefix(_PREFIX)
        expires = expiries.get(role)
        if expires is None:
            return f"TUF {role} metadata is no longer listed"
        return f"TUF {role} metadata was renewed: it expires at {stamp(expires)}"

    return reconcile(findings, open_alerts, Severity.ERROR, gone)
