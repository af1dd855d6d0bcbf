"""Rows in, public bodies out: how devices and tokens look to API clients.

Stored JSON is parsed back into wire models here, tolerantly: a reported state that
no longer validates (an agent newer than this controller) shows as "no report"
rather than failing the whole listing.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.api.schemas import (
    DegradedPublic,
    DeviceCounts,
    DeviceDetail,
    DevicePublic,
    DeviceStatus,
    DriftItemPublic,
    DriftPublic,
    PolicyRefPublic,
    TokenPublic,
)
from fleet.desired import desired_of
from fleet.errors import NotFound
from fleet.state import Drift, compute_drift
from fleet.tables import Device, DeviceTag, EnrollmentToken, as_utc
from fleet.tokens import TokenView, token_state
from models.wire import ReportedState

__all__ = [
    "device_counts",
    "device_detail",
    "device_or_404",
    "device_public",
    "device_status",
    "drift_of",
    "reported_of",
    "tags_of",
    "token_public",
    "token_view",
    "utc",
]

log = logging.getLogger(__name__)


def utc(value: datetime) -> datetime:
    """A non-null stored timestamp as aware UTC."""
    fixed = as_utc(value)
    assert fixed is not None
    return fixed


def reported_of(device: Device) -> ReportedState | None:
    """The device's last report; None when it never reported or the report no longer parses."""
    if not device.reported:
        return None
    try:
        return ReportedState.model_validate(device.reported)
    except ValidationError as exc:
        log.warning("device %s: stored ReportedState does not parse: %s", device.id, exc)
        return None


def drift_of(device: Device) -> Drift:
    return compute_drift(desired_of(device), reported_of(device))


def device_status(device: Device) -> DeviceStatus:
    if device.revoked_at is not None:
        return "revoked"
    return "online" if device.online else "offline"


def device_counts(session: Session) -> DeviceCounts:
    d = Device
    revoked = col(d.revoked_at).is_not(None)
    row = session.exec(
        select(
            func.count(),
            func.count().filter(revoked),
            func.count().filter(~revoked, col(d.online) == True),  # noqa: E712
        ).select_from(d)
    ).one()
    total, gone, online = (int(x) for x in row)
    return DeviceCounts(total=total, online=online, offline=total - gone - online, revoked=gone)


def device_or_404(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return device


def tags_of(session: Session, device_ids: list[str]) -> dict[str, list[str]]:
    """Each device's tags, sorted; one query for a whole page of devices."""
    found: dict[str, list[str]] = {i: [] for i in device_ids}
    if not device_ids:
        return found
    rows = session.exec(
        select(DeviceTag)
        .where(col(DeviceTag.device_id).in_(device_ids))
        .order_by(col(DeviceTag.device_id), col(DeviceTag.tag))
    )
    for row in rows:
        found[row.device_id].append(row.tag)
    return found


def _public_fields(device: Device, tags: list[str], drift: Drift) -> dict[str, Any]:
    reported = reported_of(device)
    return {
        "id": device.id,
        "name": device.name,
        "group": device.group,
        "tags": tags,
        "status": device_status(device),
        "online": device.online and device.revoked_at is None,
        "last_seen": as_utc(device.last_seen),
        "enrolled_at": utc(device.enrolled_at),
        "revoked_at": as_utc(device.revoked_at),
        "agent_version": device.agent_version,
        "desired_version": device.desired_version,
        "applied_version": reported.desired_version if reported else None,
        "in_sync": drift.in_sync,
        "degraded": [
            DegradedPublic(
                model=str(m.name),
                breaker=m.breaker.value,
                kind=m.kind.value,
                reason=m.reason,
                since=m.since,
            )
            for m in (reported.degraded if reported else [])
        ],
        "policy": (
            PolicyRefPublic(
                name=reported.policy.name,
                version=reported.policy.version,
                digest=reported.policy.digest,
            )
            if reported is not None and reported.policy is not None
            else None
        ),
    }


def device_public(device: Device, tags: list[str]) -> DevicePublic:
    return DevicePublic(**_public_fields(device, tags, drift_of(device)))


def device_detail(device: Device, tags: list[str]) -> DeviceDetail:
    drift = drift_of(device)
    return DeviceDetail(
        **_public_fields(device, tags, drift),
        public_key=device.public_key,
        token_id=device.token_id,
        hardware_id=device.hardware_id,
        device_report=device.device_report or {},
        desired=device.desired,
        reported=device.reported,
        reported_at=as_utc(device.reported_at),
        drift=DriftPublic(
            managed=drift.managed,
            in_sync=drift.in_sync,
            items=[
                DriftItemPublic(
                    kind=i.kind.value,
                    message=i.message,
                    model=i.model,
                    desired=i.desired,
                    actual=i.actual,
                )
                for i in drift.items
            ],
        ),
        telemetry_dropped=device.telemetry_dropped,
    )


def token_view(token: EnrollmentToken) -> TokenView:
    return TokenView(
        id=token.id,
        uses_left=token.uses_left,
        expires_at=as_utc(token.expires_at),
        revoked_at=as_utc(token.revoked_at),
    )


def token_public(token: EnrollmentToken, now: datetime) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        group=token.group,
        uses_total=token.uses_total,
        uses_left=token.uses_left,
        created_at=utc(token.created_at),
        expires_at=as_utc(token.expires_at),
        revoked_at=as_utc(token.revoked_at),
        note=token.note,
        state=token_state(token_view(token), now),
    )
