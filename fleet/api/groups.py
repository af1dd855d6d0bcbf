"""Groups: named sets of devices (the unit rollouts target), and tag counts.

A group cannot be deleted while devices are in it, or while a usable enrollment
token would put new devices into it: both would leave something pointing nowhere.
Spent, expired and revoked tokens simply forget the group.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, update
from sqlmodel import col, select

from fleet.api.audited import audit_action
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.api.present import token_view, utc
from fleet.api.schemas import GroupCreate, GroupName, GroupPublic, TagCount
from fleet.errors import Conflict, NotFound
from fleet.tables import Device, DeviceTag, EnrollmentToken, Group
from fleet.tokens import TokenState, token_state

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["groups"], dependencies=[authorize()])


def _counts(session: SessionDep) -> dict[str, int]:
    rows = session.exec(
        select(Device.group, func.count())
        .where(col(Device.group).is_not(None), col(Device.revoked_at).is_(None))
        .group_by(col(Device.group))
    ).all()
    return {name: count for name, count in rows if name is not None}


def _public(group: Group, devices: int) -> GroupPublic:
    return GroupPublic(
        name=group.name,
        description=group.description,
        created_at=utc(group.created_at),
        devices=devices,
    )


@router.get("/groups")
def list_groups(session: SessionDep) -> list[GroupPublic]:
    """Every group, by name, with how many (non-revoked) devices it holds."""
    counts = _counts(session)
    groups = session.exec(select(Group).order_by(col(Group.name))).all()
    return [_public(g, counts.get(g.name, 0)) for g in groups]


@router.post("/groups", status_code=201)
def create_group(
    body: GroupCreate, session: SessionDep, state: StateDep, who: PrincipalDep
) -> GroupPublic:
    if session.get(Group, body.name) is not None:
        raise Conflict(f"group {body.name!r} already exists")
    group = Group(name=body.name, description=body.description, created_at=state.clock())
    session.add(group)
    audit_action(session, who, state.clock(), "group.create", f"group:{body.name}")
    session.commit()
    return _public(group, 0)


@router.get("/groups/{name}")
def get_group(name: GroupName, session: SessionDep) -> GroupPublic:
    group = session.get(Group, name)
    if group is None:
        raise NotFound(f"no group {name!r}")
    return _public(group, _counts(session).get(name, 0))


@router.delete("/groups/{name}", status_code=204)
def delete_group(name: GroupName, session: SessionDep, state: StateDep, who: PrincipalDep) -> None:
    """Delete an empty group; 409 while devices or usable tokens refer to it."""
    group = session.get(Group, name)
    if group is None:
        raise NotFound(f"no group {name!r}")
    members = session.exec(
        select(func.count()).select_from(Device).where(col(Device.group) == name)
    ).one()
    if members:
        raise Conflict(
            f"group {name!r} still holds {members} device(s) (revoked ones included): "
            "move them to another group first"
        )
    tokens = session.exec(select(EnrollmentToken).where(col(EnrollmentToken.group) == name)).all()
    now = state.clock()
    usable = [t.id for t in tokens if token_state(token_view(t), now) is TokenState.ACTIVE]
    if usable:
        raise Conflict(
            f"group {name!r} is the target of usable enrollment token(s) {', '.join(usable)}: "
            "revoke them first"
        )
    session.exec(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.group) == name)
        .values(group=None)
        .execution_options(synchronize_session=False)
    )
    session.delete(group)
    audit_action(session, who, now, "group.delete", f"group:{name}")
    session.commit()


@router.get("/tags")
def list_tags(session: SessionDep) -> list[TagCount]:
    """Every tag in use, by name, with how many (non-revoked) devices carry it."""
    rows = session.exec(
        select(DeviceTag.tag, func.count())
        .join(Device, col(Device.id) == col(DeviceTag.device_id))
        .where(col(Device.revoked_at).is_(None))
        .group_by(col(DeviceTag.tag))
        .order_by(col(DeviceTag.tag))
    ).all()
    return [TagCount(tag=tag, devices=count) for tag, count in rows]
