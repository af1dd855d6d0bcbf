"""Degraded-mode policies: create a version, list, show one, assign it, remove an assignment.

Routes parse and call :mod:`fleet.policy`, which validates (422 naming the field),
numbers versions, checks each device's models and puts the policy in the signed
desired state of those that can take it. The acting admin may name themselves in
``X-Edgefleet-Actor``; the audit log records ``admin:<name>``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.errors import InvalidInput
from fleet.policy.assign import Outcome, Scope, assign, unassign
from fleet.policy.store import create_policy
from fleet.policy.views import PolicyDetail, PolicySummary, policy_detail, policy_summaries

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["policies"], dependencies=[authorize()])


class PolicyCreate(BaseModel):
    """A new version of a policy; the controller numbers it (``models.policy.FallbackPolicy``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    description: str = Field(default="", max_length=2000)
    breaker: dict[str, JsonValue] = Field(default_factory=dict)  # BreakerSettings
    chains: dict[str, JsonValue] = Field(default_factory=dict)  # served model -> Chain


class AssignBody(BaseModel):
    """A group or a device (exactly one), and the version (None: the latest, pinned now)."""

    model_config = ConfigDict(extra="forbid")

    group: str | None = Field(default=None, max_length=64)
    device: str | None = Field(default=None, max_length=63)
    version: int | None = Field(default=None, ge=1)


class DeviceReasons(BaseModel):
    device: str
    reasons: list[str]


class DesiredSent(BaseModel):
    device_id: str
    version: int  # its new desired state's version
    published: bool  # False: stored, and published when the broker is back


class AssignmentResult(BaseModel):
    """What an assignment (or its removal) did to each device it covers."""

    policy: str
    version: int
    digest: str
    scope: Literal["group", "device"]
    target: str
    assigned: list[str]  # devices whose desired state carries the policy (updated + unchanged)
    updated: list[str]  # given a new desired state
    unchanged: list[str]  # their desired state already had it
    ineligible: list[DeviceReasons]  # not changed: they lack a model a chain names
    skipped: list[DeviceReasons]  # not changed: an own assignment, or no desired state yet
    desired: list[DesiredSent]


def _result(outcome: Outcome, assigned: bool = True) -> AssignmentResult:
    return AssignmentResult(
        policy=outcome.policy,
        version=outcome.version,
        digest=outcome.digest,
        scope=outcome.scope,
        target=outcome.target,
        assigned=sorted(outcome.updated + outcome.unchanged) if assigned else [],
        updated=outcome.updated,
        unchanged=outcome.unchanged,
        ineligible=[DeviceReasons(device=s.device, reasons=s.reasons) for s in outcome.ineligible],
        skipped=[DeviceReasons(device=s.device, reasons=s.reasons) for s in outcome.skipped],
        desired=[
            DesiredSent(device_id=d.state.device_id, version=d.state.version, published=d.published)
            for d in outcome.deliveries
        ],
    )


@router.post("/policies", status_code=201)
def create(
    body: PolicyCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> PolicyDetail:
    """Store the next version of the policy; 422 names the offending field."""
    row = create_policy(
        session,
        name=body.name,
        description=body.description,
        breaker=body.breaker,
        chains=body.chains,
        actor=who.name,
        source=who.source,
        now=state.clock(),
    )
    session.commit()
    return policy_detail(session, row.name, row.version)


@router.get("/policies")
def list_policies(session: SessionDep) -> list[PolicySummary]:
    """The latest version of each policy, with how many devices have it and enforce it."""
    return policy_summaries(session)


@router.get("/policies/{name}")
def show(
    name: str,
    session: SessionDep,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> PolicyDetail:
    """One version (latest by default), every version, assignments, each device's status."""
    return policy_detail(session, name, version)


def _scope(group: str | None, device: str | None) -> tuple[Scope, str]:
    if (group is None) == (device is None):
        raise InvalidInput("give exactly one of group and device", field="group")
    return ("group", group) if group is not None else ("device", device or "")


@router.post("/policies/{name}/assign")
async def assign_policy(
    name: str, body: AssignBody, state: StateDep, who: PrincipalDep
) -> AssignmentResult:
    """Assign the policy: eligible devices get it in their signed desired state; lists the rest."""
    scope, target = _scope(body.group, body.device)
    outcome = await assign(
        state.desired,
        state.engine,
        name=name,
        version=body.version,
        scope=scope,
        target=target,
        actor=who.name,
        source=who.source,
        now=state.clock(),
    )
    return _result(outcome)


@router.delete("/policies/assignments/{scope}/{target}")
async def unassign_policy(
    scope: Scope, target: str, state: StateDep, who: PrincipalDep
) -> AssignmentResult:
    """Remove a group's or device's assignment; its devices get their group's policy, or none."""
    outcome = await unassign(
        state.desired, state.engine, scope=scope, target=target, actor=who.name,
        now=state.clock(), source=who.source,
    )  # fmt: skip
    return _result(outcome, assigned=False)
