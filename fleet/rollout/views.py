"""What the API and CLI show of rollouts: progress per stage, gate checks, the audit trail."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.rollout.plan import stage_names, stage_quotas
from fleet.rollout.spec import ModelChangeSpec, RolloutSpec
from fleet.tables import AuditEntry, GateCheckRow, Rollout, RolloutDevice, as_utc

__all__ = [
    "AuditPublic",
    "DevicePublic",
    "GateCheckPublic",
    "RolloutDetail",
    "RolloutSummary",
    "StagePublic",
    "audit_entries",
    "rollout_detail",
    "rollout_devices",
    "rollout_summaries",
]


class StagePublic(BaseModel):
    """One stage and how far its devices got."""

    index: int
    name: str  # "canary", "10%", "exponential"
    quota: int  # devices released once the stage is done (cumulative)
    devices: dict[str, int]  # state -> count, for the devices this stage released


class GateCheckPublic(BaseModel):
    """One gate check with the evidence behind its verdict."""

    stage: int
    gate: int
    at: datetime
    verdict: str  # pass, fail, insufficient
    decision: str  # pass, wait, fail, abort
    reasons: list[str]
    evidence: dict[str, Any]


class AuditPublic(BaseModel):
    """One audit log entry."""

    at: datetime
    actor: str
    action: str
    subject: str
    reason: str
    data: dict[str, Any]
    source: str = ""  # "<address> (<session|api-token|admin-token>)"; "" for the engine


class RolloutSummary(BaseModel):
    """A rollout in a listing."""

    id: str
    name: str
    kind: str  # what it changes: "model" or "policy"
    change: str  # the change for people: "gemma3 2.0", "policy edge-default v2"
    model: str | None  # a model rollout's model and version
    version: str | None
    policy: str | None  # a policy rollout's policy and version
    policy_version: int | None
    status: str
    stage: int
    stage_name: str
    stages: int
    phase: str
    devices: dict[str, int]  # state -> count
    reason: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutDetail(RolloutSummary):
    """A rollout with its spec, stages, failures, gate checks and audit trail."""

    spec: dict[str, Any]
    stage_progress: list[StagePublic]
    failures: dict[str, int]  # failure kind -> count
    gate_checks: list[GateCheckPublic]  # newest first
    audit: list[AuditPublic]  # newest first


class DevicePublic(BaseModel):
    """One device's place in a rollout."""

    device_id: str
    stage: int | None
    state: str
    variant: str | None
    placement: str | None
    version: str | None  # of the model, or the policy, it gets
    failure: str | None
    detail: str
    desired_version: int | None
    since: datetime


def _version(target: dict[str, Any] | None) -> str | None:
    version = (target or {}).get("version")
    return None if version is None else str(version)


def _counts(members: list[RolloutDevice]) -> dict[str, int]:
    return dict(Counter(m.state for m in members))


def _change_fields(spec: RolloutSpec) -> dict[str, Any]:
    change = spec.change
    if isinstance(change, ModelChangeSpec):
        return {
            "kind": change.kind,
            "change": f"{change.model} {change.version}",
            "model": change.model,
            "version": change.version,
            "policy": None,
            "policy_version": None,
        }
    return {
        "kind": change.kind,
        "change": f"policy {change.policy} v{change.version}",
        "model": None,
        "version": None,
        "policy": change.policy,
        "policy_version": change.version,
    }


def _summary(row: Rollout, devices: dict[str, int]) -> RolloutSummary:
    spec = RolloutSpec.model_validate(row.spec)
    names = stage_names(spec)
    return RolloutSummary(
        id=row.id,
        name=row.name,
        **_change_fields(spec),
        status=row.status,
        stage=row.stage,
        stage_name=names[min(row.stage, len(names) - 1)],
        stages=len(names),
        phase=row.phase,
        devices=devices,
        reason=row.reason,
        created_by=row.created_by,
        created_at=as_utc(row.created_at) or row.created_at,
        updated_at=as_utc(row.updated_at) or row.updated_at,
        finished_at=as_utc(row.finished_at),
    )


def _members(session: Session, rollout_id: str) -> list[RolloutDevice]:
    return list(
        session.exec(select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout_id)).all()
    )


def rollout_summaries(session: Session, status: str | None = None) -> list[RolloutSummary]:
    query = select(Rollout).order_by(col(Rollout.created_at).desc())
    if status is not None:
        query = query.where(col(Rollout.status) == status)
    rows = session.exec(query).all()
    counted = session.exec(
        select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
        .where(col(RolloutDevice.rollout_id).in_([row.id for row in rows]))
        .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.state))
    ).all()
    counts: dict[str, dict[str, int]] = {}
    for rollout_id, state, count in counted:
        counts.setdefault(rollout_id, {})[state] = count
    return [_summary(row, counts.get(row.id, {})) for row in rows]


def audit_entries(session: Session, subject: str | None, limit: int = 200) -> list[AuditPublic]:
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
    if subject is not None:
        query = query.where(col(AuditEntry.subject) == subject)
    return [
        AuditPublic(
            at=as_utc(e.at) or e.at,
            actor=e.actor,
            action=e.action,
            subject=e.subject,
            reason=e.reason,
            data=e.data,
            source=e.source,
        )
        for e in session.exec(query).all()
    ]


def rollout_detail(session: Session, row: Rollout, checks: int = 50) -> RolloutDetail:
    members = _members(session, row.id)
    spec = RolloutSpec.model_validate(row.spec)
    eligible = sum(1 for m in members if m.state != "ineligible")
    quotas = stage_quotas(spec, eligible)
    stages = [
        StagePublic(
            index=i,
            name=name,
            quota=quotas[i],
            devices=_counts([m for m in members if m.stage == i]),
        )
        for i, name in enumerate(stage_names(spec))
    ]
    rows = session.exec(
        select(GateCheckRow)
        .where(col(GateCheckRow.rollout_id) == row.id)
        .order_by(col(GateCheckRow.id).desc())
        .limit(checks)
    ).all()
    return RolloutDetail(
        **_summary(row, _counts(members)).model_dump(),
        spec=row.spec,
        stage_progress=stages,
        failures=dict(Counter(m.failure for m in members if m.failure and m.state == "failed"))
        | {"timed_out": sum(1 for m in members if m.state == "timed_out")},
        gate_checks=[
            GateCheckPublic(
                stage=c.stage,
                gate=c.gate,
                at=as_utc(c.at) or c.at,
                verdict=c.verdict,
                decision=c.decision,
                reasons=c.reasons,
                evidence=c.evidence,
            )
            for c in rows
        ],
        audit=audit_entries(session, f"rollout:{row.id}", limit=100),
    )


def rollout_devices(
    session: Session, rollout_id: str, state: str | None = None
) -> list[DevicePublic]:
    query = select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout_id)
    if state is not None:
        query = query.where(col(RolloutDevice.state) == state)
    return [
        DevicePublic(
            device_id=m.device_id,
            stage=m.stage,
            state=m.state,
            variant=m.variant,
            placement=m.placement,
            version=_version(m.target),
            failure=m.failure,
            detail=m.detail,
            desired_version=m.desired_version,
            since=as_utc(m.since) or m.since,
        )
        for m in session.exec(query.order_by(col(RolloutDevice.rank))).all()
    ]
