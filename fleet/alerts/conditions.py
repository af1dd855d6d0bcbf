"""Condition alerts, whatever the rule: which subjects should have an open alert. Pure.

A condition rule (a device offline, TUF metadata near expiry, a spool dropping samples)
says which subjects its condition holds for now, each as a :class:`Finding` with the
message and data its alert should show. :func:`reconcile` compares those with the
rule's open alerts and returns the changes, in the shapes of
:mod:`fleet.degraded.rules`: :class:`Raise` a subject without an open alert,
:class:`Update` an open alert whose message or data changed, :class:`Clear` one whose
subject is no longer found. Of two open alerts for one subject the older is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from pydantic import JsonValue

from fleet.degraded.rules import Action, Clear, OpenAlert, Raise, Update
from models.wire import Severity

__all__ = ["Finding", "clip", "reconcile", "stamp"]

_MAX_MESSAGE = 1000  # characters of a message; Alert.message holds 2000


@dataclass(frozen=True)
class Finding:
    """A subject the condition holds for, and what its alert says."""

    subject: str
    message: str
    data: dict[str, JsonValue]


def clip(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stamp(at: datetime) -> str:
    """'2031-05-06 07:08 UTC': a time in a message, to the minute, so it stays put."""
    return at.strftime("%Y-%m-%d %H:%M UTC")


def reconcile(
    findings: Iterable[Finding],
    open_alerts: Iterable[OpenAlert],
    severity: Severity,
    gone: Callable[[str], str],
) -> list[Action]:
    """What to change so that exactly the subjects found have one open alert each.

    ``gone(subject)`` says why a subject's alert clears, for the audit log.
    """
    found = {f.subject: f for f in findings}
    actions: list[Action] = []
    kept: set[str] = set()
    for alert in sorted(open_alerts, key=lambda a: a.id):
        if alert.subject in kept:
            actions.append(Clear(alert.id, alert.subject, "a duplicate of an older open alert"))
            continue
        kept.add(alert.subject)
        finding = found.get(alert.subject)
        if finding is None:
            actions.append(Clear(alert.id, alert.subject, gone(alert.subject)))
        elif finding.message != alert.message or finding.data != dict(alert.data):
            actions.append(Update(alert.id, alert.subject, finding.message, finding.data))
    for subject, finding in sorted(found.items()):
        if subject not in kept:
            actions.append(Raise(subject, severity, finding.message, finding.data))
    return actions
