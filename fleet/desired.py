"""Desired state: what a device (or every device in a group) should run; stored, then published.

Models registered in the model registry are resolved to signed TUF targets (path,
length, sha256: :func:`fleet.registry.select.choose_artifact`); the link signs each
device's state with the director key before publishing it (:mod:`models.director`),
and it expires after :data:`models.wire.DESIRED_LIFETIME`; :meth:`DesiredStates.renew`,
run periodically by the app, re-issues states in the last third of their life (same
models, next version), so an expiry only ever stops a state captured and held back.

Setting it is two steps, in this order: store it (the version grows by one, in the
database, atomically), then publish it retained. The database is the truth; if the
broker is down the state is still stored (``published`` False) and the link
republishes every stored desired state when it reconnects. Store-and-publish runs
under one lock per controller so two quick changes to one device cannot reach the
broker out of order and leave the older one retained; across replicas, publishing
holds a PostgreSQL advisory lock (:data:`fleet.db.DESIRED_PUBLISH_LOCK`) and skips a
state another replica has since replaced, whose newer state that replica publishes
after it.

An admin's state that names no fallback policy gets the device's assigned one
(:func:`assigned_policies`: its own assignment, else its group's; ``fleet.policy``),
so setting models never drops the degraded-mode policy; unless the new models lack
one that the policy's chains need, when it gets none (``edgefleet policies show``
names what is missing). Renewals and rollouts keep a state's fallback as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

from pydantic import JsonValue, ValidationError
from sqlalchemy import Engine, bindparam, update
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet.db import DESIRED_PUBLISH_LOCK, advisory_lock, in_chunks
from fleet.errors import BrokerUnavailable, Conflict, DatabaseUnavailable, NotFound
from fleet.link.port import LinkPort
from fleet.registry.select import choose_artifact
from fleet.registry.targets import target_path
from fleet.registry.variants import Ineligible, candidate_of, choose_variant
from fleet.tables import Device, Group, ModelArtifact, PolicyAssignment, PolicyRow
from models.device import DeviceReport
from models.policy import FallbackPolicy
from models.wire import DESIRED_LIFETIME, DesiredModel, DesiredState, TargetRef

__all__ = [
    "RENEW_BEFORE",
    "Delivery",
    "DesiredExtras",
    "DesiredStates",
    "Extras",
    "WantedModel",
    "WantedState",
    "assigned_policies",
    "desired_model_of",
    "desired_of",
    "due_for_renewal",
    "registered_rows",
    "report_of",
    "resolve_models",
    "store_desired",
    "store_desired_many",
]

log = logging.getLogger(__name__)

RENEW_BEFORE = DESIRED_LIFETIME / 3  # re-issue a desired state when less than this is left
PUBLISH_CONCURRENCY = 64  # publishes in flight when one change reaches many devices


class WantedModel(Protocol):
    """A model an admin asks for (the API's DesiredModelBody is one)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str | None: ...
    @property
    def variant(self) -> str | None: ...


class DesiredExtras(Protocol):
    """The parts of a desired state besides its models, kept as they are by a model change."""

    @property
    def config(self) -> dict[str, JsonValue]: ...
    @property
    def fallback(self) -> dict[str, JsonValue]: ...


class WantedState(Protocol):
    """What an admin asks a device to run (the API's DesiredBody is one)."""

    @property
    def models(self) -> Sequence[WantedModel]: ...
    @property
    def config(self) -> dict[str, JsonValue]: ...
    @property
    def fallback(self) -> dict[str, JsonValue]: ...


@dataclass(frozen=True)
class Extras:
    """A desired state's config and fallback, as :class:`DesiredExtras`."""

    config: dict[str, JsonValue]
    fallback: dict[str, JsonValue]


@dataclass(frozen=True)
class Delivery:
    """A stored desired state, and whether the broker has it yet."""

    state: DesiredState
    published: bool  # False: stored; the link publishes it when the broker is back


def desired_of(device: Device) -> DesiredState | None:
    """The device's stored desired state; None when none was set or it no longer parses."""
    if not device.desired:
        return None
    try:
        return DesiredState.model_validate(device.desired)
    except ValidationError as exc:
        log.warning("device %s: stored DesiredState does not parse: %s", device.id, exc)
        return None


def due_for_renewal(state: DesiredState, now: datetime) -> bool:
    """Re-issue a desired state in the last third of its life, so devices never see it lapse."""
    return state.expires - now < RENEW_BEFORE


def resolve_models(
    session: Session,
    wanted: Sequence[WantedModel],
    report: DeviceReport | None = None,
    registered: Mapping[str, Sequence[ModelArtifact]] | None = None,
) -> list[DesiredModel]:
    """The wire models for ``wanted``: registered models get their signed target.

    A version with several variants and none named gets the one that best fits the
    device's ``report`` (docs/variants.md); ``Conflict`` when none fits. ``registered``
    (from :func:`registered_rows`) saves the registry queries when resolving for many.
    """
    resolved = []
    for model in wanted:
        rows = (registered or registered_rows(session, [model]))[model.name]
        if not rows:
            if model.variant is not None:
                raise NotFound(f"model {model.name!r} is not in the registry")
            resolved.append(DesiredModel(name=model.name, version=model.version))
            continue
        row = choose_artifact(rows, model.version, model.variant, partial(_best_fit, report))
        resolved.append(desired_model_of(row))
    return resolved


def desired_model_of(row: ModelArtifact) -> DesiredModel:
    """A registered artifact as the desired model that sends a device its signed target."""
    target = TargetRef(
        path=target_path(row.name, row.version, row.variant, row.format),
        length=row.size_bytes,
        sha256=row.sha256,
    )
    return DesiredModel(name=row.name, version=row.version, target=target)


def registered_rows(
    session: Session, wanted: Sequence[WantedModel]
) -> dict[str, Sequence[ModelArtifact]]:
    """Every registry row of each wanted model, by name."""
    return {
        model.name: session.exec(
            select(ModelArtifact).where(col(ModelArtifact.name) == model.name)
        ).all()
        for model in wanted
    }


def _best_fit(report: DeviceReport | None, rows: Sequence[ModelArtifact]) -> ModelArtifact:
    choice = choose_variant([candidate_of(row) for row in rows], report)
    if isinstance(choice, Ineligible):
        raise Conflict(f"{rows[0].name} {rows[0].version}: {choice.summary}")
    return next(row for row in rows if row.variant == choice.variant)


def report_of(device: Device | None) -> DeviceReport | None:
    """What the device reported of itself; None when it never did or it does not parse."""
    if device is None or not device.device_report:
        return None
    try:
        return DeviceReport.model_validate(device.device_report)
    except ValidationError:
        return None


def store_desired(
    session: Session,
    device_id: str,
    models: list[DesiredModel],
    wanted: DesiredExtras,
    now: datetime,
) -> DesiredState:
    """Bump the version and store the new state, in the caller's transaction.

    Publish what it returns with :meth:`DesiredStates.apply`, which orders it with
    every other change.
    """
    stored = store_desired_many(session, [(device_id, models, wanted)], now)
    if not stored:
        if session.get(Device, device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        raise Conflict(f"device {device_id} is revoked")
    return stored[0]


def store_desired_many(
    session: Session,
    wanted: Sequence[tuple[str, list[DesiredModel], DesiredExtras]],
    now: datetime,
) -> list[DesiredState]:
    """:func:`store_desired` for many devices at once, in a few statements per 500.

    A 100% rollout stage gives thousands of devices their next state in one step; one
    statement per device would hold the database for seconds. Rows are locked and written
    in device id order, the one order every bulk writer of devices uses. A revoked
    device is left out, so the result may be shorter than ``wanted``.
    """
    asked = {device_id: (models, extras) for device_id, models, extras in wanted}
    table = Device.__table__  # type: ignore[attr-defined]
    conn = session.connection()
    states: list[DesiredState] = []
    for chunk in in_chunks(sorted(asked)):
        conn.execute(
            select(table.c.id)
            .where(table.c.id.in_(chunk))
            .order_by(table.c.id)
            .with_for_update(key_share=True)
        ).all()
        bumped = conn.execute(
            update(table)
            .where(table.c.id.in_(chunk), table.c.revoked_at.is_(None))
            .values(desired_version=table.c.desired_version + 1)
            .returning(table.c.id, table.c.desired_version)
        ).all()
        for device_id, version in sorted(bumped):
            models, extras = asked[device_id]
            states.append(
                DesiredState(
                    device_id=device_id,
                    version=version,
                    issued_at=now,
                    expires=now + DESIRED_LIFETIME,
                    models=models,
                    config=extras.config,
                    fallback=extras.fallback,
                )
            )
    if states:
        conn.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(desired=bindparam("b_desired")),
            [{"b_id": s.device_id, "b_desired": s.model_dump(mode="json")} for s in states],
        )
    return states


def assigned_policies(session: Session, devices: Sequence[Device]) -> dict[str, PolicyRow]:
    """Each device's assigned policy version, by device id: its own assignment, else its group's.

    Devices with neither are left out.
    """
    groups = sorted({d.group for d in devices if d.group is not None})
    wanted = [("device", chunk) for chunk in in_chunks(sorted(d.id for d in devices))]
    wanted += [("group", chunk) for chunk in in_chunks(groups)]
    found: dict[tuple[str, str], PolicyAssignment] = {}
    for scope, chunk in wanted:
        for row in session.exec(
            select(PolicyAssignment).where(
                col(PolicyAssignment.scope) == scope, col(PolicyAssignment.target).in_(chunk)
            )
        ):
            found[(row.scope, row.target)] = row
    picks: dict[str, tuple[str, int]] = {}
    for device in devices:
        assignment = found.get(("device", device.id))
        if assignment is None and device.group is not None:
            assignment = found.get(("group", device.group))
        if assignment is not None:
            picks[device.id] = (assignment.policy, assignment.version)
    rows: dict[tuple[str, int], PolicyRow] = {}
    for chunk in in_chunks(sorted({name for name, _ in picks.values()})):
        for policy in session.exec(select(PolicyRow).where(col(PolicyRow.name).in_(chunk))):
            rows[(policy.name, policy.version)] = policy
    return {device_id: rows[pick] for device_id, pick in picks.items() if pick in rows}


def _reported_names(device: Device) -> set[str]:
    models = (device.reported or {}).get("models") or []
    return {str(m["name"]) for m in models if isinstance(m, dict) and m.get("state") != "missing"}


def _with_assigned_policy(
    device: Device | None,
    models: list[DesiredModel],
    wanted: WantedState,
    assigned: Mapping[str, PolicyRow],
) -> DesiredExtras:
    """``wanted``, or, when it names no fallback, ``wanted`` with the device's assigned policy.

    The policy goes only where the device has every model its chains need, the rule of
    :func:`fleet.policy.eligibility.ineligible_reasons` (a chain for a model the device
    does not serve never applies, so it needs nothing).
    """
    if wanted.fallback or device is None or device.id not in assigned:
        return wanted
    row = assigned[device.id]
    has = {m.name for m in models} | _reported_names(device)
    try:
        policy = FallbackPolicy.model_validate(row.body)
    except ValidationError:
        log.warning("policy %s v%d: stored body does not parse", row.name, row.version)
        return wanted
    fits = all(
        set(chain.models()) <= has for served, chain in policy.chains.items() if served in has
    )
    return Extras(config=wanted.config, fallback=row.body if fits else {})


def _store_for_device(
    engine: Engine, device_id: str, wanted: WantedState, now: datetime
) -> DesiredState:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        models = resolve_models(session, wanted.models)
        assigned = assigned_policies(session, [device]) if device is not None else {}
        extras = _with_assigned_policy(device, models, wanted, assigned)
        state = store_desired(session, device_id, models, extras, now)
        session.commit()
        return state


def _store_for_group(
    engine: Engine, group: str, wanted: WantedState, now: datetime
) -> list[DesiredState]:
    with Session(engine) as session:
        if session.get(Group, group) is None:
            raise NotFound(f"no group {group!r}")
        devices = session.exec(
            select(Device)
            .where(col(Device.group) == group, col(Device.revoked_at).is_(None))
            .order_by(col(Device.id))
        ).all()
        rows = registered_rows(session, wanted.models)
        assigned = assigned_policies(session, devices)
        wanted_by_device = []
        for device in devices:
            models = resolve_models(session, wanted.models, report_of(device), rows)
            extras = _with_assigned_policy(device, models, wanted, assigned)
            wanted_by_device.append((device.id, models, extras))
        states = store_desired_many(session, wanted_by_device, now)
        session.commit()
        return states


def _stored_versions(engine: Engine, device_ids: Sequence[str]) -> dict[str, int]:
    """Each device's newest stored desired version."""
    versions: dict[str, int] = {}
    with Session(engine) as session:
        for chunk in in_chunks(device_ids):
            rows = session.exec(
                select(Device.id, Device.desired_version).where(col(Device.id).in_(chunk))
            ).all()
            versions.update((device_id, version) for device_id, version in rows)
    return versions


def _store_renewals(engine: Engine, now: datetime) -> list[DesiredState]:
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
        renewed = store_desired_many(session, [(d, list(s.models), s) for d, s in due], now)
        session.commit()
        return renewed


class DesiredStates:
    """Stores desired states and publishes them, one change at a time (one per controller)."""

    def __init__(self, engine: Engine, link: LinkPort, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._link = link
        self._clock = clock  # aware UTC
        self._lock = asyncio.Lock()  # orders store-and-publish, so the newest state is retained

    async def set_for_device(self, device_id: str, wanted: WantedState) -> Delivery:
        """Replace the device's desired state; ``NotFound`` or ``Conflict`` (revoked)."""
        async with self._lock:
            stored = await run_in_threadpool(
                _store_for_device, self._engine, device_id, wanted, self._clock()
            )
            [delivery] = await self._publish_many([stored])
            return delivery

    async def set_for_group(self, group: str, wanted: WantedState) -> list[Delivery]:
        """Replace the desired state of every non-revoked device in ``group``, each on its own."""
        async with self._lock:
            stored = await run_in_threadpool(
                _store_for_group, self._engine, group, wanted, self._clock()
            )
            return await self._publish_many(stored)

    async def apply(self, work: Callable[[], Sequence[DesiredState]]) -> list[Delivery]:
        """Run ``work`` (it stores states with :func:`store_desired` and commits), then publish.

        For callers that change desired states inside a larger transaction of their own
        (the rollout engine); they still queue behind every other change.
        """
        async with self._lock:
            stored = await run_in_threadpool(work)
            return await self._publish_many(stored)

    async def renew(self) -> int:
        """Re-issue and publish the desired states close to expiry; how many were renewed."""
        async with self._lock:
            renewed = await run_in_threadpool(_store_renewals, self._engine, self._clock())
            await self._publish_many(renewed)
        return len(renewed)

    async def _publish_many(self, states: Sequence[DesiredState]) -> list[Delivery]:
        """Publish states of distinct devices, in version order across replicas."""
        if not states:
            return []
        try:
            async with advisory_lock(self._engine, DESIRED_PUBLISH_LOCK):
                ids = [state.device_id for state in states]
                newest = await run_in_threadpool(_stored_versions, self._engine, ids)
                return await self._send(states, newest)
        except DatabaseUnavailable as exc:  # stored already: better sent than held back
            log.warning("publishing %d desired state(s) without the lock: %s", len(states), exc)
            return await self._send(states, {})

    async def _send(
        self, states: Sequence[DesiredState], newest: Mapping[str, int]
    ) -> list[Delivery]:
        """Send each state not replaced since; many in flight (a 100% stage is thousands)."""
        slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(state: DesiredState) -> Delivery:
            if newest.get(state.device_id, 0) > state.version:
                return Delivery(state, published=True)  # replaced: its replacement goes out
            async with slots:
                return await self._publish(state)

        return list(await asyncio.gather(*(one(state) for state in states)))

    async def _publish(self, state: DesiredState) -> Delivery:
        try:
            await self._link.publish_desired(state)
        except BrokerUnavailable:
            return Delivery(state, published=False)  # stored; the link republishes it
        return Delivery(state, published=True)
