"""Staged rollouts: create one, follow it, pause, resume, approve or abort it; the audit log.

Routes parse and call the engine (:class:`fleet.rollout.engine.RolloutEngine`), which
validates against the fleet and writes every action with its audit entry. The acting
admin may name themselves in ``X-Edgefleet-Actor`` (the CLI sends the login name); the
audit log records ``admin:<name>``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.errors import NotFound
from fleet.rollout.spec import RolloutSpec
from fleet.rollout.views import (
    AuditPublic,
    DevicePublic,
    RolloutDetail,
    RolloutSummary,
    audit_entries,
    rollout_detail,
    rollout_devices,
    rollout_summaries,
)
from fleet.tables import Rollout

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["rollouts"], dependencies=[authorize()])

Action = Literal["pause", "resume", "approve", "abort"]


class ActionBody(BaseModel):
    """Why, for the audit log."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500)


def _row(session: SessionDep, rollout_id: str) -> Rollout:
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return row


@router.post("/rollouts", status_code=201)
async def create_rollout(
    spec: RolloutSpec, state: StateDep, session: SessionDep, who: PrincipalDep
) -> RolloutDetail:
    """Validate the rollout against the fleet and start it; 422 names the field, 409 a rival.

    The change is a model version (``{"model", "version"}``, the default kind) or a
    fallback policy (``{"kind": "policy", "policy", "version"}``; no version: the
    latest, stored as a fixed number).
    """
    rollout_id = await state.rollouts.create(spec, who.name, who.source)
    return rollout_detail(session, _row(session, rollout_id))


@router.get("/rollouts")
def list_rollouts(
    session: SessionDep,
    status: Annotated[Literal["active", "paused", "completed", "aborted"] | None, Query()] = None,
) -> list[RolloutSummary]:
    return rollout_summaries(session, status)


@router.get("/rollouts/{rollout_id}")
def get_rollout(rollout_id: str, session: SessionDep) -> RolloutDetail:
    """Progress per stage, failures, the latest gate checks with evidence, the audit trail."""
    return rollout_detail(session, _row(session, rollout_id))


@router.get("/rollouts/{rollout_id}/devices")
def list_rollout_devices(
    rollout_id: str,
    session: SessionDep,
    state: Annotated[str | None, Query(max_length=16)] = None,
) -> list[DevicePublic]:
    _row(session, rollout_id)
    return rollout_devices(session, rollout_id, state)


@router.post("/rollouts/{rollout_id}/{action}")
async def act_on_rollout(
    rollout_id: str,
    action: Action,
    state: StateDep,
    session: SessionDep,
    who: PrincipalDep,
    body: ActionBody | None = None,
) -> RolloutDetail:
    """Pause, resume, approve the next stage, or abort (which rolls changed devices back)."""
    reason = body.reason if body is not None else ""
    await state.rollouts.act(rollout_id, action, who.name, reason, who.source)
    session.expire_all()
    return rollout_detail(session, _row(session, rollout_id))


@router.get("/audit")
def list_audit(
    session: SessionDep,
    subject: Annotated[str | None, Query(max_length=96)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[AuditPublic]:
    """Who or what did what and why, newest first."""
    return audit_entries(session, subject, limit)
