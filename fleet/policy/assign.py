"""Giving a policy to a group or a device: the assignment, then each device's desired state.

An assignment names one policy version (the latest when none is given, pinned then).
A device's own assignment wins over its group's, so assigning to a group leaves
devices with their own alone. Each target device that can take the policy
(:mod:`fleet.policy.eligibility`) gets a new desired state keeping its models and
config, with ``fallback`` the policy's JSON; the desired-state path signs it, binds it
to the device, versions and publishes it like any other. A device that cannot take it
is left as it is and listed with the reasons; one with no desired state yet is left
too, and gets the policy with its first one (:func:`fleet.desired.assigned_policies`).

Both run inside :meth:`fleet.desired.DesiredStates.apply`, so they queue behind every
other desired-state change and the assignment, the states and the audit entry commit
together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import JsonValue
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet import audit
from fleet.desired import (
    Delivery,
    DesiredStates,
    Extras,
    assigned_policies,
    desired_of,
    store_desired_many,
)
from fleet.errors import Conflict, NotFound
from fleet.policy.eligibility import device_models, ineligible_reasons
from fleet.policy.store import get_policy, policy_of, subject
from fleet.tables import Device, Group, PolicyAssignment, PolicyRow
from models.policy import policy_digest
from models.wire import DesiredModel, DesiredState

__all__ = ["NO_DESIRED", "Outcome", "Scope", "Skipped", "assign", "unassign"]

Scope = Literal["group", "device"]
NO_DESIRED = "no desired state yet: its first one gets the policy that applies then"
OWN_ASSIGNMENT = "has its own policy assignment, which wins over its group's"


@dataclass(frozen=True)
class Skipped:
    """A target device whose desired state was not changed, and why."""

    device: str
    reasons: list[str]


@dataclass
class Outcome:
    """What an assignment (or its removal) did to the devices it covers."""

    scope: Scope
    target: str
    policy: str
    version: int
    digest: str
    updated: list[str] = field(default_factory=list)  # given a new desired state
    unchanged: list[str] = field(default_factory=list)  # their desired state already had it
    ineligible: list[Skipped] = field(default_factory=list)  # lack a model a chain names
    skipped: list[Skipped] = field(default_factory=list)  # own assignment, no desired state
    deliveries: list[Delivery] = field(default_factory=list)


Wanted = tuple[str, list[DesiredModel], Extras]


async def assign(
    desired: DesiredStates,
    engine: Engine,
    *,
    name: str,
    version: int | None,
    scope: Scope,
    target: str,
    actor: str,
    now: datetime,
    source: str = "",
) -> Outcome:
    """Assign version ``version`` of ``name`` (latest when None) to a group or a device.

    ``NotFound`` for an unknown policy, version, group or device; ``Conflict`` for a
    revoked device.
    """

    def change(session: Session) -> tuple[Outcome, list[Wanted]]:
        row = get_policy(session, name, version)
        devices = _targets(session, scope, target)
        _upsert(session, scope, target, row, actor, now)
        outcome = Outcome(scope, target, row.name, row.version, row.digest)
        return outcome, _eligible_states(session, row, devices, outcome)

    return await _apply(desired, engine, change, "policy.assign", actor, now, source)


async def unassign(
    desired: DesiredStates,
    engine: Engine,
    *,
    scope: Scope,
    target: str,
    actor: str,
    now: datetime,
    source: str = "",
) -> Outcome:
    """Remove the group's or device's assignment; its devices fall back to the group's, or none.

    ``NotFound`` when nothing is assigned there.
    """

    def change(session: Session) -> tuple[Outcome, list[Wanted]]:
        assignment = session.get(PolicyAssignment, (scope, target))
        if assignment is None:
            raise NotFound(f"no policy is assigned to {scope} {target!r}")
        row = get_policy(session, assignment.policy, assignment.version)
        devices = _targets(session, scope, target, must_exist=False)
        session.delete(assignment)
        session.flush()
        outcome = Outcome(scope, target, row.name, row.version, row.digest)
        return outcome, _states_after_removal(session, devices, outcome)

    return await _apply(desired, engine, change, "policy.unassign", actor, now, source)


async def _apply(
    desired: DesiredStates,
    engine: Engine,
    change: Callable[[Session], tuple[Outcome, list[Wanted]]],
    action: str,
    actor: str,
    now: datetime,
    source: str,
) -> Outcome:
    """Make ``change``, store the devices' new states and the audit entry, then publish."""
    outcomes: list[Outcome] = []

    def work() -> list[DesiredState]:
        with Session(engine) as session:
            outcome, wanted = change(session)
            states = store_desired_many(session, wanted, now)
            outcome.updated = [s.device_id for s in states]
            _record(session, action, outcome, actor, now, source)
            session.commit()
            outcomes.append(outcome)
            return states

    deliveries = await desired.apply(work)
    outcomes[0].deliveries = deliveries
    return outcomes[0]


def _targets(session: Session, scope: Scope, target: str, must_exist: bool = True) -> list[Device]:
    """The non-revoked devices the assignment covers, in id order."""
    if scope == "device":
        device = session.get(Device, target)
        if device is None:
            if must_exist:
                raise NotFound(f"no device {target!r}")
            return []
        if device.revoked_at is not None:
            if must_exist:
                raise Conflict(f"device {target} is revoked")
            return []
        return [device]
    if must_exist and session.get(Group, target) is None:
        raise NotFound(f"no group {target!r}")
    return list(
        session.exec(
            select(Device)
            .where(col(Device.group) == target, col(Device.revoked_at).is_(None))
            .order_by(col(Device.id))
        )
    )


def _upsert(
    session: Session, scope: Scope, target: str, row: PolicyRow, actor: str, now: datetime
) -> None:
    assignment = session.get(PolicyAssignment, (scope, target))
    if assignment is None:
        assignment = PolicyAssignment(
            scope=scope,
            target=target,
            policy=row.name,
            version=row.version,
            assigned_by=actor,
            assigned_at=now,
        )
    else:
        assignment.policy, assignment.version = row.name, row.version
        assignment.assigned_by, assignment.assigned_at = actor, now
    session.add(assignment)
    session.flush()


def _own_assignments(session: Session, devices: Sequence[Device]) -> set[str]:
    ids = [d.id for d in devices]
    if not ids:
        return set()
    return set(
        session.exec(
            select(PolicyAssignment.target).where(
                col(PolicyAssignment.scope) == "device", col(PolicyAssignment.target).in_(ids)
            )
        )
    )


def _eligible_states(
    session: Session, row: PolicyRow, devices: Sequence[Device], outcome: Outcome
) -> list[Wanted]:
    """The new states of the devices that take the policy; the rest go into ``outcome``."""
    policy = policy_of(row)
    own = _own_assignments(session, devices) if outcome.scope == "group" else set()
    wanted: list[Wanted] = []
    for device in devices:
        if device.id in own:
            outcome.skipped.append(Skipped(device.id, [OWN_ASSIGNMENT]))
            continue
        reasons = ineligible_reasons(policy, device_models(device))
        if reasons:
            outcome.ineligible.append(Skipped(device.id, reasons))
            continue
        change = _with_fallback(device, row.body, row.digest, outcome)
        if change is not None:
            wanted.append(change)
    return wanted


def _states_after_removal(
    session: Session, devices: Sequence[Device], outcome: Outcome
) -> list[Wanted]:
    """Each device's state with the policy that now applies to it (its group's), or none."""
    own = _own_assignments(session, devices) if outcome.scope == "group" else set()
    left = [d for d in devices if d.id not in own]
    outcome.skipped.extend(Skipped(d.id, [OWN_ASSIGNMENT]) for d in devices if d.id in own)
    now_assigned = assigned_policies(session, left)
    wanted: list[Wanted] = []
    for device in left:
        body: dict[str, JsonValue] = {}
        digest = ""
        row = now_assigned.get(device.id)
        if row is not None:
            reasons = ineligible_reasons(policy_of(row), device_models(device))
            if reasons:
                outcome.ineligible.append(Skipped(device.id, reasons))
            else:
                body, digest = row.body, row.digest
        change = _with_fallback(device, body, digest, outcome)
        if change is not None:
            wanted.append(change)
    return wanted


def _with_fallback(
    device: Device, body: dict[str, JsonValue], digest: str, outcome: Outcome
) -> Wanted | None:
    """The device's current state with ``body`` as its fallback; None when nothing changes."""
    current = desired_of(device)
    if current is None:
        outcome.skipped.append(Skipped(device.id, [NO_DESIRED]))
        return None
    has = policy_digest(current.fallback) if current.fallback else ""
    if has == digest:
        outcome.unchanged.append(device.id)
        return None
    return (device.id, list(current.models), Extras(config=current.config, fallback=body))


def _record(
    session: Session, action: str, outcome: Outcome, actor: str, now: datetime, source: str
) -> None:
    audit.record(
        session,
        at=now,
        actor=actor,
        source=source,
        action=action,
        subject=subject(outcome.policy),
        reason=f"{outcome.scope} {outcome.target}",
        data={
            "version": outcome.version,
            "scope": outcome.scope,
            "target": outcome.target,
            "updated": outcome.updated,
            "unchanged": outcome.unchanged,
            "ineligible": {s.device: s.reasons for s in outcome.ineligible},
            "skipped": {s.device: s.reasons for s in outcome.skipped},
        },
    )
