"""Which groups are degraded enough to alert on, and what to do about their alerts: pure.

A device *counts* toward its group when it is not revoked and is online or was seen
within ``seen_within_s`` (:func:`counts_toward`): a device that just restarted keeps
counting, one gone silent for long neither raises nor holds an alert with a report
that may be stale. It is *degraded* when its last report lists at least one model
answered by its fallbacks (``ReportedState.degraded``). A group's share is its
degraded devices over the devices that count.

:func:`decide` compares each group's health with the open alerts and returns what to
change, a tagged union: :class:`Raise` when a group without an open alert reaches
the threshold (share at least ``share``, at least ``min_devices`` degraded),
:class:`Update` when an open alert's numbers changed, :class:`Clear` when its group
is below the threshold again (or has no device that counts any more). An alert is
open exactly while its condition holds; the shell (:mod:`fleet.alerts.evaluate`)
writes the changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import JsonValue, ValidationError

from models.wire import DegradedModel, ReportedState, Severity

__all__ = [
    "GROUP_DEGRADED",
    "Action",
    "Clear",
    "GroupHealth",
    "ModelTally",
    "OpenAlert",
    "Raise",
    "Thresholds",
    "Update",
    "counts_toward",
    "decide",
    "degraded_of",
    "group_health",
    "group_of_subject",
    "group_subject",
    "message",
]

GROUP_DEGRADED = "group_degraded"  # Alert.kind
_SUBJECT_PREFIX = "group:"
_MAX_TALLIES_IN_MESSAGE = 4
_MAX_DEVICE_IDS = 50  # kept in an alert's data; the count is always exact


@dataclass(frozen=True)
class Thresholds:
    """When a group's degraded share raises an alert (``FleetSettings.degraded_alert_*``)."""

    share: float  # 0 < share <= 1: degraded devices over devices that count
    min_devices: int  # at least this many degraded devices, whatever the share


def group_subject(group: str) -> str:
    return f"{_SUBJECT_PREFIX}{group}"


def group_of_subject(subject: str) -> str | None:
    return subject.removeprefix(_SUBJECT_PREFIX) if subject.startswith(_SUBJECT_PREFIX) else None


def degraded_of(reported: Mapping[str, Any] | None) -> list[DegradedModel]:
    """The degraded models of a stored report; none when there is none or it does not parse.

    The same tolerance as the device views: a report this controller cannot read
    (an agent newer than it) shows as no report, so it never raises an alert either.
    """
    if not reported:
        return []
    try:
        return list(ReportedState.model_validate(reported).degraded)
    except ValidationError:
        return []


def counts_toward(
    *,
    revoked: bool,
    online: bool,
    last_seen: datetime | None,
    now: datetime,
    seen_within_s: float,
) -> bool:
    """Whether a device counts in its group's degraded share (module docstring)."""
    if revoked:
        return False
    if online:
        return True
    return last_seen is not None and last_seen >= now - timedelta(seconds=seen_within_s)


@dataclass(frozen=True)
class ModelTally:
    """One model in one breaker state, over a group's degraded devices."""

    model: str
    breaker: str  # models.wire.BreakerState
    devices: int
    kinds: tuple[str, ...]  # models.policy.FailureKind values that opened it, sorted

    def describe(self) -> str:
        return f"{self.model} {self.breaker} on {self.devices} ({', '.join(self.kinds)})"


@dataclass(frozen=True)
class GroupHealth:
    """How many of a group's devices count, which are degraded, and on what."""

    group: str
    devices: int  # devices that count
    degraded: tuple[str, ...]  # their ids, sorted
    tallies: tuple[ModelTally, ...]  # most devices first

    @property
    def share(self) -> float:
        return len(self.degraded) / self.devices if self.devices else 0.0

    def crosses(self, thresholds: Thresholds) -> bool:
        return (
            self.devices > 0
            and len(self.degraded) >= thresholds.min_devices
            and self.share >= thresholds.share
        )


def group_health(
    group: str, devices: int, degraded: Mapping[str, Iterable[DegradedModel]]
) -> GroupHealth:
    """A group's health from its count of devices and each degraded device's models.

    ``degraded`` maps device ids to their degraded models; a device with none is not
    degraded (and one listed twice under a model counts once).
    """
    seen: dict[tuple[str, str], set[str]] = {}
    kinds: dict[tuple[str, str], set[str]] = {}
    ids = []
    for device_id, models in degraded.items():
        models = list(models)
        if not models:
            continue
        ids.append(device_id)
        for m in models:
            key = (str(m.name), m.breaker.value)
            seen.setdefault(key, set()).add(device_id)
            kinds.setdefault(key, set()).add(m.kind.value)
    tallies = sorted(
        (ModelTally(k[0], k[1], len(v), tuple(sorted(kinds[k]))) for k, v in seen.items()),
        key=lambda t: (-t.devices, t.model, t.breaker),
    )
    return GroupHealth(group, max(devices, len(ids)), tuple(sorted(ids)), tuple(tallies))


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%"


def message(health: GroupHealth, thresholds: Thresholds) -> str:
    """'3 of 10 devices in lab are degraded (30% >= 20%): gemma3-270m open on 3 (error)'."""
    n = len(health.degraded)
    relation = ">=" if health.share >= thresholds.share else "<"
    verb = "is" if n == 1 else "are"
    text = (
        f"{n} of {health.devices} devices in {health.group} {verb} degraded "
        f"({_percent(health.share)} {relation} {_percent(thresholds.share)})"
    )
    shown = [t.describe() for t in health.tallies[:_MAX_TALLIES_IN_MESSAGE]]
    more = len(health.tallies) - len(shown)
    if more > 0:
        shown.append(f"{more} more")
    return f"{text}: {'; '.join(shown)}" if shown else text


def _data(health: GroupHealth, thresholds: Thresholds) -> dict[str, JsonValue]:
    return {
        "group": health.group,
        "devices": health.devices,
        "degraded": len(health.degraded),
        "share": round(health.share, 4),
        "threshold": thresholds.share,
        "min_devices": thresholds.min_devices,
        "device_ids": list(health.degraded[:_MAX_DEVICE_IDS]),
        "models": [
            {"model": t.model, "breaker": t.breaker, "devices": t.devices, "kinds": list(t.kinds)}
            for t in health.tallies
        ],
    }


@dataclass(frozen=True)
class OpenAlert:
    """An alert not cleared yet, as stored."""

    id: int
    subject: str
    message: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Raise:
    """Open a new alert for ``subject``."""

    subject: str
    severity: Severity
    message: str
    data: dict[str, JsonValue]


@dataclass(frozen=True)
class Update:
    """An open alert's numbers changed: rewrite its message and data."""

    alert_id: int
    subject: str
    message: str
    data: dict[str, JsonValue]


@dataclass(frozen=True)
class Clear:
    """The condition no longer holds: close the alert."""

    alert_id: int
    subject: str
    reason: str  # why it cleared, for the audit log


Action = Raise | Update | Clear


def decide(
    health: Iterable[GroupHealth],
    open_alerts: Iterable[OpenAlert],
    thresholds: Thresholds,
) -> list[Action]:
    """What to change so that exactly the groups over the threshold have one open alert.

    ``health`` holds every group with devices that count; an open alert whose group
    is not in it (every device gone, revoked or silent) clears. Of two open alerts
    for one subject (written by a controller before this check existed) the older
    is kept and the other cleared.
    """
    by_group = {h.group: h for h in health}
    actions: list[Action] = []
    kept: dict[str, OpenAlert] = {}
    for alert in sorted(open_alerts, key=lambda a: a.id):
        group = group_of_subject(alert.subject)
        current = by_group.get(group) if group is not None else None
        if alert.subject in kept:
            actions.append(Clear(alert.id, alert.subject, "a duplicate of an older open alert"))
            continue
        if current is None or not current.crosses(thresholds):
            reason = (
                message(current, thresholds)
                if current is not None
                else f"no device of {group or alert.subject} counts any more"
            )
            actions.append(Clear(alert.id, alert.subject, reason))
            kept[alert.subject] = alert
            continue
        kept[alert.subject] = alert
        text, data = message(current, thresholds), _data(current, thresholds)
        if text != alert.message or data != dict(alert.data):
            actions.append(Update(alert.id, alert.subject, text, data))
    for group, current in sorted(by_group.items()):
        subject = group_subject(group)
        if subject not in kept and current.crosses(thresholds):
            actions.append(
                Raise(
                    subject,
                    Severity.WARNING,
                    message(current, thresholds),
                    _data(current, thresholds),
                )
            )
    return actions
