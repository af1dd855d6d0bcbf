"""``rollout_failed``: a rollout aborted, or a gate check of one of its stages failing. Pure.

These are events, not conditions: an aborted rollout stays aborted, so its alert
(subject ``rollout:<id>``, severity error) stays open until an admin acknowledges it,
which clears it. While it is open, later events of the same rollout (another failed
check, then the abort) update it. After an acknowledgement only an event newer than
what the acknowledged alert showed (its ``data.last_at``) raises a new one.

Only events within ``lookback_hours`` are raised, so turning the rule on does not
bring up every abort in the database; with ``gate_failures`` off, only aborts count.
An abort names who did it: the engine (``controller``, by its gates or abort rules)
or an admin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import JsonValue

from fleet.alerts.conditions import clip
from fleet.degraded.rules import Action, Clear, OpenAlert, Raise, Update
from fleet.rollout.step import subject as rollout_subject
from models.wire import Severity

__all__ = ["Abort", "GateFailure", "RolloutTrouble", "decide", "rollout_subject"]


@dataclass(frozen=True)
class Abort:
    """How a rollout ended: when, by whom, why."""

    at: datetime
    by: str  # an admin, or "controller"
    reason: str


@dataclass(frozen=True)
class GateFailure:
    """One gate check that failed (``decision`` fail or abort)."""

    at: datetime
    stage: int
    gate: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RolloutTrouble:
    """A rollout with an abort or failed gate checks (any age; :func:`decide` windows them)."""

    rollout: str  # its id
    name: str
    change: str  # "model:<name>", "policy:<name>"
    aborted: Abort | None
    gate_failures: tuple[GateFailure, ...]  # oldest first


@dataclass(frozen=True)
class _Seen:
    aborted: Abort | None
    failures: tuple[GateFailure, ...]

    @property
    def last_at(self) -> datetime | None:
        times = [f.at for f in self.failures]
        if self.aborted is not None:
            times.append(self.aborted.at)
        return max(times, default=None)


def _title(trouble: RolloutTrouble) -> str:
    what = f" {trouble.name!r}" if trouble.name else ""
    return f"rollout{what} ({trouble.rollout}, {trouble.change})"


def _failure(failure: GateFailure) -> str:
    why = "; ".join(failure.reasons) or "no reason given"
    return f"stage {failure.stage}, gate {failure.gate}: {why}"


def _message(trouble: RolloutTrouble, seen: _Seen, lookback_hours: float) -> str:
    if seen.aborted is not None:
        text = f"{_title(trouble)} aborted by {seen.aborted.by}: {seen.aborted.reason}"
    else:
        last = seen.failures[-1]
        text = (
            f"{_title(trouble)}: {len(seen.failures)} failed gate check(s) in the last "
            f"{lookback_hours:g} h; the latest, {_failure(last)}"
        )
    return clip(text)


def _data(trouble: RolloutTrouble, seen: _Seen) -> dict[str, JsonValue]:
    last_at = seen.last_at
    data: dict[str, JsonValue] = {
        "rollout": trouble.rollout,
        "name": trouble.name,
        "change": trouble.change,
        "aborted": seen.aborted is not None,
        "gate_failures": len(seen.failures),
        "last_at": last_at.isoformat() if last_at is not None else None,
    }
    if seen.aborted is not None:
        data["aborted_at"] = seen.aborted.at.isoformat()
        data["aborted_by"] = seen.aborted.by
        data["reason"] = clip(seen.aborted.reason, 500)
    if seen.failures:
        last = seen.failures[-1]
        data["last_failure"] = {
            "at": last.at.isoformat(),
            "stage": last.stage,
            "gate": last.gate,
            "reasons": list(last.reasons),
        }
    return data


def decide(
    troubles: Iterable[RolloutTrouble],
    open_alerts: Iterable[OpenAlert],
    covered: Mapping[str, datetime],
    *,
    gate_failures: bool,
    lookback_hours: float,
    now: datetime,
) -> list[Action]:
    """Raise and update ``rollout_failed`` alerts; never clear one (an admin does).

    ``covered`` maps a subject to the ``last_at`` of its latest alert that is no longer
    open: events up to then were seen and acknowledged. An open alert whose rollout is
    not in ``troubles`` (its events are older than the lookback) is left as it is.
    """
    since = now - timedelta(hours=lookback_hours)
    seen: dict[str, tuple[RolloutTrouble, _Seen]] = {}
    for trouble in troubles:
        aborted = trouble.aborted if trouble.aborted and trouble.aborted.at >= since else None
        failures = tuple(f for f in trouble.gate_failures if f.at >= since) if gate_failures else ()
        if aborted is not None or failures:
            seen[rollout_subject(trouble.rollout)] = (trouble, _Seen(aborted, failures))
    actions: list[Action] = []
    kept: set[str] = set()
    for alert in sorted(open_alerts, key=lambda a: a.id):
        if alert.subject in kept:
            actions.append(Clear(alert.id, alert.subject, "a duplicate of an older open alert"))
            continue
        kept.add(alert.subject)
        if alert.subject not in seen:
            continue
        trouble, events = seen[alert.subject]
        text, data = _message(trouble, events, lookback_hours), _data(trouble, events)
        if text != alert.message or data != dict(alert.data):
            actions.append(Update(alert.id, alert.subject, text, data))
    for subject, (trouble, events) in sorted(seen.items()):
        last_at = events.last_at
        if subject in kept or last_at is None:
            continue
        if subject in covered and last_at <= covered[subject]:
            continue  # acknowledged already
        actions.append(
            Raise(
                subject,
                Severity.ERROR,
                _message(trouble, events, lookback_hours),
                _data(trouble, events),
            )
        )
    return actions
