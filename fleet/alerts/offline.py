"""``device_offline``: a device gone quiet for longer than an admin tolerates. Pure.

The controller's notion of online is the device's ``online`` flag: set by every live
message, cleared by the device's last will (OFFLINE) or after three missed heartbeats
(:mod:`fleet.link.housekeeping`). A device is *offline too long* when it is not
revoked, not online, and was last seen (or, never seen since, enrolled) more than
``minutes`` ago. Its alert (subject ``device:<id>``, severity warning) clears when the
device is online again, or is revoked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from fleet.alerts.conditions import Finding, reconcile, stamp
from fleet.alerts.params import DeviceOfflineParams
from fleet.degraded.rules import Action, OpenAlert
from models.wire import Severity

__all__ = ["DevicePresence", "decide", "device_of_subject", "device_subject", "label"]

_PREFIX = "device:"


def device_subject(device_id: str) -> str:
    return f"{_PREFIX}{device_id}"


def device_of_subject(subject: str) -> str | None:
    return subject.removeprefix(_PREFIX) if subject.startswith(_PREFIX) else None


def label(device_id: str, name: str) -> str:
    """'edge-1 (dev-1a2b)', or the id alone when the name says nothing more."""
    return f"{name} ({device_id})" if name and name != device_id else device_id


@dataclass(frozen=True)
class DevicePresence:
    """What the controller knows of a device that is not revoked."""

    id: str
    name: str
    group: str | None
    online: bool
    last_seen: datetime | None  # None: never seen since it enrolled
    enrolled_at: datetime

    @property
    def seen(self) -> datetime:
        """When it was last heard from; its enrollment counts, which it did itself."""
        return self.last_seen or self.enrolled_at


def _finding(device: DevicePresence, params: DeviceOfflineParams) -> Finding:
    where = f" in group {device.group}" if device.group else ""
    return Finding(
        device_subject(device.id),
        f"{label(device.id, device.name)}{where} has been offline since {stamp(device.seen)} "
        f"(more than {params.minutes:g} min)",
        {
            "device": device.id,
            "name": device.name,
            "group": device.group,
            "last_seen": device.last_seen.isoformat() if device.last_seen else None,
            "minutes": params.minutes,
        },
    )


def decide(
    devices: Iterable[DevicePresence],
    open_alerts: Iterable[OpenAlert],
    params: DeviceOfflineParams,
    now: datetime,
) -> list[Action]:
    """Raise, update and clear ``device_offline`` alerts; ``devices``: every one not revoked."""
    limit = now - timedelta(minutes=params.minutes)
    present = {d.id: d for d in devices}
    findings = [_finding(d, params) for d in present.values() if not d.online and d.seen < limit]

    def gone(subject: str) -> str:
        device_id = device_of_subject(subject) or subject
        device = present.get(device_id)
        if device is None:
            return f"{device_id} is revoked or gone"
        if device.online:
            return f"{label(device.id, device.name)} is online again"
        return f"{label(device.id, device.name)} was seen at {stamp(device.seen)}"

    return reconcile(findings, open_alerts, Severity.WARNING, gone)
