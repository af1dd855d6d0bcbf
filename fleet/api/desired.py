"""Desired state routes: read a device's, set a device's or a whole group's.

The work (resolving registered models, versioning, storing, publishing in order) is
:mod:`fleet.desired`'s; an answer is 202 with ``"published": false`` when the broker is
down, because the state is stored and the link republishes it on reconnect.
"""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.audited import audit_action
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.api.present import device_or_404
from fleet.api.schemas import DesiredBody, DesiredPublished, GroupDesiredPublished
from fleet.desired import Delivery, desired_of
from fleet.errors import NotFound
from models.wire import DesiredState

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["desired state"], dependencies=[authorize()])


def _published(delivery: Delivery) -> DesiredPublished:
    return DesiredPublished(
        device_id=delivery.state.device_id,
        version=delivery.state.version,
        published=delivery.published,
        desired=delivery.state.model_dump(mode="json"),
    )


def _audit(
    session: SessionDep,
    who: PrincipalDep,
    state: StateDep,
    subject: str,
    deliveries: list[Delivery],
    body: DesiredBody,
) -> None:
    """Audited after the change commits (the service owns that transaction)."""
    versions = {d.state.device_id: d.state.version for d in deliveries[:100]}
    audit_action(
        session, who, state.clock(), "desired.set", subject,
        desired=body.model_dump(mode="json"), devices=len(deliveries), versions=versions,
    )  # fmt: skip
    session.commit()


@router.get("/devices/{device_id}/desired")
def get_desired(device_id: str, session: SessionDep) -> DesiredState:
    """The latest desired state set for the device; 404 when none was ever set."""
    desired = desired_of(device_or_404(session, device_id))
    if desired is None:
        raise NotFound(f"no desired state set for device {device_id!r}")
    return desired


@router.put("/devices/{device_id}/desired", status_code=202)
async def put_desired(
    device_id: str, body: DesiredBody, state: StateDep, session: SessionDep, who: PrincipalDep
) -> DesiredPublished:
    """Replace the device's desired state; the device reconciles when it receives it."""
    delivery = await state.desired.set_for_device(device_id, body)
    _audit(session, who, state, f"device:{device_id}", [delivery], body)
    return _published(delivery)


@router.put("/groups/{name}/desired", status_code=202)
async def put_group_desired(
    name: str, body: DesiredBody, state: StateDep, session: SessionDep, who: PrincipalDep
) -> GroupDesiredPublished:
    """Replace the desired state of every non-revoked device in the group, each versioned alone."""
    deliveries = await state.desired.set_for_group(name, body)
    _audit(session, who, state, f"group:{name}", deliveries, body)
    return GroupDesiredPublished(group=name, devices=[_published(d) for d in deliveries])
