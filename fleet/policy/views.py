"""What the API shows of policies: the latest of each, one in detail, each device's status.

A device assigned a policy (its own assignment, else its group's) is, for that version:
``enforcing`` when it reports the policy's digest; ``ineligible`` when it lacks a model
a chain names (with the reasons); ``rejected`` when it sent a ``policy_rejected``
event since the assignment; ``pending`` otherwise (sent, not yet confirmed; or the
device has no desired state yet).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.db import in_chunks
from fleet.desired import assigned_policies
from fleet.policy.eligibility import device_models, ineligible_reasons
from fleet.policy.store import get_policy, policy_of
from fleet.tables import Device, EventRow, PolicyAssignment, PolicyRow, as_utc
from models.wire import EventKind

__all__ = [
    "AssignmentPublic",
    "DeviceStatus",
    "PolicyDetail",
    "PolicySummary",
    "VersionPublic",
    "policy_detail",
    "policy_summaries",
    "reported_digest",
]

Status = Literal["enforcing", "pending", "ineligible", "rejected"]


class VersionPublic(BaseModel):
    """One version of a policy: immutable once stored."""

    version: int
    digest: str
    description: str
    created_by: str
    created_at: datetime


class PolicySummary(VersionPublic):
    """The latest version of a policy, and how many devices have it."""

    name: str
    versions: int
    assignments: int  # groups and devices it is assigned to
    devices_assigned: int  # devices it applies to (own assignment, else their group's)
    devices_enforcing: int  # of those, reporting the digest of the version assigned


class AssignmentPublic(BaseModel):
    """A group or device given a version of the policy."""

    scope: str
    target: str
    version: int
    assigned_by: str
    assigned_at: datetime


class DeviceStatus(BaseModel):
    """Where one assigned device stands with its version (see the module docstring)."""

    device_id: str
    name: str
    group: str | None
    version: int  # the version assigned to it
    status: Status
    reasons: list[str]  # why ineligible, rejected or pending
    reported: dict[str, Any] | None  # the PolicyRef it reports, if any


class PolicyDetail(VersionPublic):
    """One version in full, every version, its assignments, each assigned device's status."""

    name: str
    body: dict[str, Any]  # models.policy.FallbackPolicy
    versions: list[VersionPublic]
    assignments: list[AssignmentPublic]
    devices: list[DeviceStatus]


def reported_digest(device: Device) -> str | None:
    """The digest of the policy the device says it enforces."""
    policy = (device.reported or {}).get("policy")
    digest = policy.get("digest") if isinstance(policy, dict) else None
    return digest if isinstance(digest, str) else None


def _version(row: PolicyRow) -> VersionPublic:
    return VersionPublic(
        version=row.version,
        digest=row.digest,
        description=row.description,
        created_by=row.created_by,
        created_at=as_utc(row.created_at) or row.created_at,
    )


def _live_devices(session: Session) -> list[Device]:
    return list(
        session.exec(
            select(Device).where(col(Device.revoked_at).is_(None)).order_by(col(Device.id))
        )
    )


def policy_summaries(session: Session) -> list[PolicySummary]:
    """The latest version of every policy, by name, with its assignment counts."""
    latest = session.exec(
        select(PolicyRow.name, func.max(PolicyRow.version), func.count())
        .group_by(col(PolicyRow.name))
        .order_by(col(PolicyRow.name))
    ).all()
    assignments = Counter(session.exec(select(PolicyAssignment.policy)).all())
    devices = _live_devices(session)
    assigned = Counter[str]()
    enforcing = Counter[str]()
    by_device = assigned_policies(session, devices)
    for device in devices:
        row = by_device.get(device.id)
        if row is None:
            continue
        assigned[row.name] += 1
        if reported_digest(device) == row.digest:
            enforcing[row.name] += 1
    summaries = []
    for name, version, count in latest:
        row = get_policy(session, name, version)
        summaries.append(
            PolicySummary(
                name=name,
                versions=count,
                assignments=assignments[name],
                devices_assigned=assigned[name],
                devices_enforcing=enforcing[name],
                **_version(row).model_dump(),
            )
        )
    return summaries


def policy_detail(session: Session, name: str, version: int | None = None) -> PolicyDetail:
    """One version (latest when None), every version, its assignments and device statuses."""
    row = get_policy(session, name, version)
    versions = session.exec(
        select(PolicyRow).where(col(PolicyRow.name) == name).order_by(col(PolicyRow.version))
    ).all()
    assignments = session.exec(
        select(PolicyAssignment)
        .where(col(PolicyAssignment.policy) == name)
        .order_by(col(PolicyAssignment.scope), col(PolicyAssignment.target))
    ).all()
    return PolicyDetail(
        name=row.name,
        body=row.body,
        versions=[_version(v) for v in versions],
        assignments=[
            AssignmentPublic(
                scope=a.scope,
                target=a.target,
                version=a.version,
                assigned_by=a.assigned_by,
                assigned_at=as_utc(a.assigned_at) or a.assigned_at,
            )
            for a in assignments
        ],
        devices=_device_statuses(session, name, assignments),
        **_version(row).model_dump(),
    )


def _device_statuses(
    session: Session, name: str, assignments: Sequence[PolicyAssignment]
) -> list[DeviceStatus]:
    groups = sorted({a.target for a in assignments if a.scope == "group"})
    own = sorted({a.target for a in assignments if a.scope == "device"})
    candidates: dict[str, Device] = {}
    for chunk in in_chunks(own):
        for device in session.exec(select(Device).where(col(Device.id).in_(chunk))):
            candidates[device.id] = device
    for chunk in in_chunks(groups):
        for device in session.exec(select(Device).where(col(Device.group).in_(chunk))):
            candidates[device.id] = device
    live = [d for _, d in sorted(candidates.items()) if d.revoked_at is None]
    effective = assigned_policies(session, live)
    mine = [d for d in live if (r := effective.get(d.id)) is not None and r.name == name]
    since = {(a.scope, a.target): as_utc(a.assigned_at) for a in assignments}
    rejections = _rejections(session, [d.id for d in mine])
    statuses = []
    for device in mine:
        row = effective[device.id]
        when = since.get(("device", device.id)) or since.get(("group", device.group or ""))
        status, reasons = _status_of(device, row, when, rejections.get(device.id, []))
        reported = (device.reported or {}).get("policy")
        statuses.append(
            DeviceStatus(
                device_id=device.id,
                name=device.name,
                group=device.group,
                version=row.version,
                status=status,
                reasons=reasons,
                reported=reported if isinstance(reported, dict) else None,
            )
        )
    return statuses


def _status_of(
    device: Device,
    row: PolicyRow,
    assigned_at: datetime | None,
    rejections: list[tuple[datetime, str]],
) -> tuple[Status, list[str]]:
    if reported_digest(device) == row.digest:
        return "enforcing", []
    reasons = ineligible_reasons(policy_of(row), device_models(device))
    if reasons:
        return "ineligible", reasons
    after = [reason for at, reason in rejections if assigned_at is None or at >= assigned_at]
    if after:
        return "rejected", after[-1:]
    if not device.desired:
        return "pending", ["no desired state yet: its first one gets the policy"]
    return "pending", []


def _rejections(session: Session, ids: list[str]) -> dict[str, list[tuple[datetime, str]]]:
    """Each device's policy_rejected events, oldest first, with their reasons."""
    found: dict[str, list[tuple[datetime, str]]] = {}
    for chunk in in_chunks(ids):
        events = session.exec(
            select(EventRow)
            .where(
                col(EventRow.device_id).in_(chunk),
                col(EventRow.kind) == EventKind.POLICY_REJECTED.value,
            )
            .order_by(col(EventRow.ts))
        )
        for event in events:
            reason = str(event.data.get("reason") or event.message or "rejected by the device")
            at = as_utc(event.ts) or event.ts
            found.setdefault(event.device_id, []).append((at, reason))
    return found
