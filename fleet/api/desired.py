"""Desired state: what a device (or every device in a group) should run.

Models registered in the model registry are resolved to signed TUF targets (path,
length, sha256: :func:`fleet.registry.select.choose_artifact`); the link signs each
device's state with the director key before publishing it (:mod:`models.director`),
and it expires after :data:`models.wire.DESIRED_LIFETIME`; :func:`renew_desired`, run
periodically by the app, re-issues states in the last third of their life (same models,
next version), so an expiry only ever stops a state captured and held back.

Setting it is two steps, in this order: store it (the version grows by one, in the
database, atomically), then publish it retained. The database is the truth; if the
broker is down the answer is still 202 with ``"published": false`` and the link
republishes every stored desired state when it reconnects. Store-and-publish runs
under one lock per controller so two quick changes to one device cannot reach the
broker out of order and leave the older one retained.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet.api.deps import Admin, FleetState, LinkDep, SessionDep, StateDep
from fleet.api.present import desired_of, device_or_404
from fleet.api.schemas import DesiredBody, DesiredPublished, GroupDesiredPublished
from fleet.errors import BrokerUnavailable, Conflict, NotFound
from fleet.link.port import LinkPort
from fleet.registry.select import choose_artifact
from fleet.registry.targets import target_path
from fleet.tables import Device, Group, ModelArtifact
from models.wire import DESIRED_LIFETIME, DesiredModel, DesiredState, TargetRef

__all__ = ["RENEW_BEFORE", "due_for_renewal", "renew_desired", "resolve_models", "router"]

RENEW_BEFORE = DESIRED_LIFETIME / 3  # re-issue a desired state when less than this is left

router = APIRouter(prefix="/api/v1", tags=["desired state"], dependencies=[Admin])


def resolve_models(session: Session, body: DesiredBody) -> list[DesiredModel]:
    """The wire models for ``body``: registered models get their signed target."""
    resolved = []
    for wanted in body.models:
        rows = session.exec(
            select(ModelArtifact).where(col(ModelArtifact.name) == wanted.name)
        ).all()
        if not rows:
            if wanted.variant is not None:
                raise NotFound(f"model {wanted.name!r} is not in the registry")
            resolved.append(DesiredModel(name=wanted.name, version=wanted.version))
            continue
        row = choose_artifact(rows, wanted.version, wanted.variant)
        target = TargetRef(
            path=target_path(row.name, row.version, row.variant, row.format),
            length=row.size_bytes,
            sha256=row.sha256,
        )
        resolved.append(DesiredModel(name=row.name, version=row.version, target=target))
    return resolved


def _store(
    session: Session,
    device_id: str,
    models: list[DesiredModel],
    body: DesiredBody | DesiredState,
    now: datetime,
) -> DesiredState:
    """Bump the version and store the new state, in the caller's transaction."""
    bumped = session.exec(
        update(Device)
        .where(col(Device.id) == device_id, col(Device.revoked_at).is_(None))
        .values(desired_version=col(Device.desired_version) + 1)
        .execution_options(synchronize_session=False)
    )
    if bumped.rowcount != 1:
        device_or_404(session, device_id)
        raise Conflict(f"device {device_id} is revoked")
    version = session.exec(select(Device.desired_version).where(col(Device.id) == device_id)).one()
    state = DesiredState(
        device_id=device_id,
        version=version,
        issued_at=now,
        expires=now + DESIRED_LIFETIME,
        models=models,
        config=body.config,
        fallback=body.fallback,
    )
    session.exec(
        update(Device)
        .where(col(Device.id) == device_id)
        .values(desired=state.model_dump(mode="json"))
        .execution_options(synchronize_session=False)
    )
    return state


def _store_one(engine: Engine, device_id: str, body: DesiredBody, now: datetime) -> DesiredState:
    with Session(engine) as session:
        state = _store(session, device_id, resolve_models(session, body), body, now)
        session.commit()
        return state


def _store_group(
    engine: Engine, group: str, body: DesiredBody, now: datetime
) -> list[DesiredState]:
    with Session(engine) as session:
        if session.get(Group, group) is None:
            raise NotFound(f"no group {group!r}")
        ids = session.exec(
            select(Device.id)
            .where(col(Device.group) == group, col(Device.revoked_at).is_(None))
            .order_by(col(Device.id))
        ).all()
        models = resolve_models(session, body)
        states = [_store(session, device_id, models, body, now) for device_id in ids]
        session.commit()
        return states


def due_for_renewal(state: DesiredState, now: datetime) -> bool:
    """Re-issue a desired state in the last third of its life, so devices never see it lapse."""
    return state.expires - now < RENEW_BEFORE


def _renew_stored(engine: Engine, now: datetime) -> list[DesiredState]:
    """Re-issue every desired state due (same content, next version, new expiry), at once."""
    with Session(engine) as session:
        devices = session.exec(
            select(Device).where(col(Device.revoked_at).is_(None), col(Device.desired_version) > 0)
        ).all()
        due = [
            (device.id, current)
            for device in devices
            if (current := desired_of(device)) is not None and due_for_renewal(current, now)
        ]
        renewed = [_store(session, device_id, list(s.models), s, now) for device_id, s in due]
        session.commit()
        return renewed


async def renew_desired(state: FleetState) -> int:
    """Re-issue and publish the desired states close to expiry; how many were renewed."""
    async with state.publish_lock:
        renewed = await run_in_threadpool(_renew_stored, state.engine, state.clock())
        for desired in renewed:
            await _publish(state.link, desired)
    return len(renewed)


async def _publish(link: LinkPort, state: DesiredState) -> DesiredPublished:
    try:
        await link.publish_desired(state)
        published = True
    except BrokerUnavailable:
        published = False  # stored; the link republishes it on reconnect
    return DesiredPublished(
        device_id=state.device_id,
        version=state.version,
        published=published,
        desired=state.model_dump(mode="json"),
    )


@router.get("/devices/{device_id}/desired")
def get_desired(device_id: str, session: SessionDep) -> DesiredState:
    """The latest desired state set for the device; 404 when none was ever set."""
    desired = desired_of(device_or_404(session, device_id))
    if desired is None:
        raise NotFound(f"no desired state set for device {device_id!r}")
    return desired


@router.put("/devices/{device_id}/desired", status_code=202)
async def put_desired(
    device_id: str, body: DesiredBody, state: StateDep, link: LinkDep
) -> DesiredPublished:
    """Replace the device's desired state; the device reconciles when it receives it."""
    async with state.publish_lock:
        stored = await run_in_threadpool(_store_one, state.engine, device_id, body, state.clock())
        return await _publish(link, stored)


@router.put("/groups/{name}/desired", status_code=202)
async def put_group_desired(
    name: str, body: DesiredBody, state: StateDep, link: LinkDep
) -> GroupDesiredPublished:
    """Replace the desired state of every non-revoked device in the group, each versioned alone."""
    async with state.publish_lock:
        stored = await run_in_threadpool(_store_group, state.engine, name, body, state.clock())
        results = [await _publish(link, s) for s in stored]
    return GroupDesiredPublished(group=name, devices=results)
