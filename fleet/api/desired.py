"""Desired state routes: read a device's, set a device's or a whole group's.

The work (resolving registered models, versioning, storing, publishing in order) is
:mod:`fleet.desired`'s; an answer is 202 with ``"published": false`` when the broker is
down, because the state is stored and the link republishes it on reconnect.
"""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.deps import Admin, SessionDep, StateDep
from fleet.api.present import device_or_404
from fleet.api.schemas import DesiredBody, DesiredPublished, GroupDesiredPublished
from fleet.desired import Delivery, desired_of
from fleet.errors import NotFound
from models.wire import DesiredState

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["desired state"], dependencies=[Admin])


def _published(delivery: Delivery) -> DesiredPublished:
    return DesiredPublished(
        device_id=delivery.state.device_id,
        version=delivery.state.version,
        published=delivery.published,
        desired=delivery.state.model_dump(mode="json"),
    )


@router.get("/devices/{device_id}/desired")
def get_desired(device_id: str, session: SessionDep) -> DesiredState:
    """The latest desired state set for the device; 404 when none was ever set."""
    desired = desired_of(device_or_404(session, device_id))
    if desired is None:
        raise NotFound(f"no desired state set for device {device_id!r}")
    return desired


@router.put("/devices/{device_id}/desired", status_code=202)
async def put_desired(device_id: str, body: DesiredBody, state: StateDep) -> DesiredPublished:
    """Replace the device's desired state; the device reconciles when it receives it."""
    return _published(await state.desired.set_for_device(device_id, body))


@router.put("/groups/{name}/desired", status_code=202)
async def put_group_desired(name: str, body: DesiredBody, state: StateDep) -> GroupDesiredPublished:
    """Replace the desired state of every non-revoked device in the group, each versioned alone."""
    deliveries = await state.desired.set_for_group(name, body)
    return GroupDesiredPublished(group=name, devices=[_published(d) for d in deliveries])
