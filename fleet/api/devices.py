"""Devices: list and search, detail with drift, rename/regroup/retag, revoke, one-off commands.

Listings and details show what a device last reported of degraded mode: the models its
fallbacks answer (``degraded``) and the policy it enforces (``policy``);
``?degraded=true`` lists only the non-revoked devices whose last report is degraded.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import Engine, exists, func, update
from sqlmodel import Session, col, delete, select
from starlette.concurrency import run_in_threadpool

from fleet.api.audited import audit_action
from fleet.api.deps import LinkDep, PrincipalDep, SessionDep, StateDep, authorize
from fleet.api.present import device_detail, device_or_404, device_public, tags_of
from fleet.api.schemas import (
    CommandAccepted,
    CommandCreate,
    DeviceDetail,
    DeviceList,
    DeviceStatus,
    DeviceUpdate,
    GroupName,
    Tag,
)
from fleet.auth import Principal, Role
from fleet.degraded import is_degraded
from fleet.errors import BrokerUnavailable, Conflict, InvalidInput
from fleet.tables import Device, DeviceTag, Group
from models.wire import Command, CommandKind

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/devices", tags=["devices"], dependencies=[authorize()])


@router.get("")
def list_devices(
    session: SessionDep,
    group: GroupName | None = None,
    tag: Tag | None = None,
    status: DeviceStatus | None = None,
    q: Annotated[str | None, Query(max_length=128, description="part of name or id")] = None,
    degraded: Annotated[
        bool | None,
        Query(description="true: only non-revoked devices whose last report lists degraded models"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeviceList:
    """Devices matching every filter given, oldest enrollment first, with the total count."""
    d = Device
    where = []
    if group is not None:
        where.append(col(d.group) == group)
    if tag is not None:
        where.append(
            exists().where(col(DeviceTag.device_id) == col(d.id), col(DeviceTag.tag) == tag)
        )
    if status == "revoked":
        where.append(col(d.revoked_at).is_not(None))
    elif status is not None:
        where.append(col(d.revoked_at).is_(None))
        where.append(col(d.online) == (status == "online"))
    if degraded is not None:
        degraded_now = col(d.revoked_at).is_(None) & is_degraded()
        where.append(degraded_now if degraded else ~degraded_now)
    if q:
        where.append(
            col(d.name).icontains(q, autoescape=True) | col(d.id).icontains(q, autoescape=True)
        )
    total = session.exec(select(func.count()).select_from(d).where(*where)).one()
    devices = session.exec(
        select(d).where(*where).order_by(col(d.enrolled_at), col(d.id)).limit(limit).offset(offset)
    ).all()
    tags = tags_of(session, [x.id for x in devices])
    return DeviceList(
        total=total,
        limit=limit,
        offset=offset,
        items=[device_public(x, tags[x.id]) for x in devices],
    )


@router.get("/{device_id}")
def get_device(device_id: str, session: SessionDep) -> DeviceDetail:
    """Identity, state, desired and reported state, and the drift between them."""
    device = device_or_404(session, device_id)
    return device_detail(device, tags_of(session, [device.id])[device.id])


@router.patch("/{device_id}")
def update_device(
    device_id: str, body: DeviceUpdate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> DeviceDetail:
    """Rename, regroup or retag a device; ``tags`` replaces the whole set."""
    device = device_or_404(session, device_id)
    fields = body.model_fields_set
    if "name" in fields:
        if body.name is None:
            raise InvalidInput("name cannot be null")
        device.name = body.name
    if "group" in fields:
        if body.group is not None and session.get(Group, body.group) is None:
            raise InvalidInput(f"no group {body.group!r}: create it first")
        device.group = body.group
    if "tags" in fields:
        session.exec(delete(DeviceTag).where(col(DeviceTag.device_id) == device.id))
        for tag in body.tags or []:
            session.add(DeviceTag(device_id=device.id, tag=tag))
    session.add(device)
    changes = body.model_dump(include=fields, mode="json")
    audit_action(session, who, state.clock(), "device.update", f"device:{device.id}", **changes)
    session.commit()
    return device_detail(device, tags_of(session, [device.id])[device.id])


def _revoke(engine: Engine, device_id: str, now: datetime, who: Principal) -> DeviceDetail:
    with Session(engine, expire_on_commit=False) as session:
        device = device_or_404(session, device_id)
        session.exec(
            update(Device)
            .where(col(Device.id) == device_id, col(Device.revoked_at).is_(None))
            .values(revoked_at=now, online=False)
            .execution_options(synchronize_session=False)
        )
        audit_action(session, who, now, "device.revoke", f"device:{device_id}")
        session.commit()
        session.refresh(device)
        return device_detail(device, tags_of(session, [device.id])[device.id])


@router.post("/{device_id}/revoke", dependencies=[authorize(write=Role.ADMIN)])
async def revoke_device(
    device_id: str, state: StateDep, link: LinkDep, who: PrincipalDep
) -> DeviceDetail:
    """Cut a device off for good: its broker login goes at once, its retained state too.

    Idempotent: revoking again re-syncs the broker, which repairs a revocation whose
    first sync failed.
    """
    detail = await run_in_threadpool(_revoke, state.engine, device_id, state.clock(), who)
    await link.sync_auth()
    try:
        await link.clear_desired(device_id)
    except BrokerUnavailable as exc:
        # The device can no longer log in, so a stale retained message harms nothing.
        log.warning("revoked %s, but its retained desired state stays for now: %s", device_id, exc)
    return detail


def _check_commandable(engine: Engine, device_id: str) -> None:
    with Session(engine) as session:
        device = device_or_404(session, device_id)
        if device.revoked_at is not None:
            raise Conflict(f"device {device_id} is revoked")


@router.post("/{device_id}/commands", status_code=202)
async def send_command(
    device_id: str, body: CommandCreate, state: StateDep, link: LinkDep
) -> CommandAccepted:
    """Publish a one-off command; a device that is offline now never sees it (not retained)."""
    await run_in_threadpool(_check_commandable, state.engine, device_id)
    command = Command(device_id=device_id, id=uuid.uuid4().hex, kind=CommandKind(body.kind))
    await link.send_command(command)
    return CommandAccepted(id=command.id, device_id=device_id, kind=command.kind.value)
