"""``spool_dropped``: a device's telemetry spool dropping samples, lately. Pure.

An agent's spool (``agent/link/spool.py``) holds telemetry while the broker is out of
reach; full, or refused by the disk, it drops the oldest entries and reports the count
twice: in the next batch's ``dropped`` (the controller adds it to the device's
``telemetry_dropped``) and, once that batch is acknowledged, in a ``spool_dropped``
event with ``{"samples": n, "events": m}``. The rule reads those events, as the
controller stored them (its own clock, not the device's).

A device has an open alert (subject ``device:<id>``, severity warning) while the drop
reports stored in the last ``window_minutes`` add up to at least ``min_samples``
samples; it clears once no such report has come for that long. It is a condition: an
acknowledgement is recorded and the alert stays open until the drops stop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from fleet.alerts.conditions import Finding, reconcile, stamp
from fleet.alerts.offline import device_of_subject, device_subject, label
from fleet.alerts.params import SpoolDroppedParams
from fleet.degraded.rules import Action, OpenAlert
from models.wire import Severity

__all__ = ["DropReport", "decide"]


@dataclass(frozen=True)
class DropReport:
    """One ``spool_dropped`` event of a device, as stored."""

    device: str
    at: datetime  # when the controller stored it
    samples: int
    events: int


@dataclass
class _Tally:
    samples: int = 0
    events: int = 0
    last_at: datetime | None = None


def _window(minutes: float) -> str:
    return f"{minutes / 60:g} h" if minutes >= 60 and minutes % 60 == 0 else f"{minutes:g} min"


def decide(
    reports: Iterable[DropReport],
    names: Mapping[str, str],
    totals: Mapping[str, int],
    open_alerts: Iterable[OpenAlert],
    params: SpoolDroppedParams,
    now: datetime,
) -> list[Action]:
    """Raise, update and clear ``spool_dropped`` alerts.

    ``reports`` may hold older ones (they are left out); ``names`` and ``totals`` hold
    each device's name and ``telemetry_dropped`` (devices missing there are revoked
    or gone: their reports count for nothing).
    """
    since = now - timedelta(minutes=params.window_minutes)
    tallies: dict[str, _Tally] = {}
    for report in reports:
        if report.at < since or report.device not in names:
            continue
        tally = tallies.setdefault(report.device, _Tally())
        tally.samples += report.samples
        tally.events += report.events
        tally.last_at = report.at if tally.last_at is None else max(tally.last_at, report.at)
    window = _window(params.window_minutes)
    findings = []
    for device, tally in tallies.items():
        if tally.samples < params.min_samples or tally.last_at is None:
            continue
        events = f" and {tally.events} events" if tally.events else ""
        total = totals.get(device, 0)
        findings.append(
            Finding(
                device_subject(device),
                f"{label(device, names[device])}'s telemetry spool dropped {tally.samples} "
                f"samples{events} in the last {window} (the latest reported at "
                f"{stamp(tally.last_at)}); {total} samples since it enrolled",
                {
                    "device": device,
                    "samples": tally.samples,
                    "events": tally.events,
                    "last_at": tally.last_at.isoformat(),
                    "window_minutes": params.window_minutes,
                    "total": total,
                },
            )
        )

    def gone(subject: str) -> str:
        device = device_of_subject(subject) or subject
        if device not in names:
            return f"{device} is revoked or gone"
        return f"{label(device, names[device])}'s spool dropped no samples in the last {window}"

    return reconcile(findings, open_alerts, Severity.WARNING, gone)
