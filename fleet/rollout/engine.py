"""The rollout engine: a reconcile loop whose every state lives in the database.

Each step reads one rollout and its devices, decides with the pure functions of
:mod:`fleet.rollout.plan` and :mod:`fleet.rollout.gates`, and writes the outcome (device
states, new signed desired states, gate checks with their evidence, audit entries) in
one transaction; the desired states are published after it commits. A controller killed
mid-step loses the whole step and the next one starts from what was committed, so a
restart resumes where the rollout was, with no stage skipped or repeated; a desired
state committed but not yet published reaches the broker when the link republishes
stored states on connect.

With several replicas only the leader (``fleet.leases``) runs the loop; admins'
actions run on whichever replica they reach. Either way, two controllers on one
database never advance a stage twice: a step takes the
rollout's row with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL; another
controller skips the rollout for this round) and writes it back only at the revision it
read (any database), so of two writers one commits and the other rolls back. Admin
actions write the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet.audit import record
from fleet.desired import DesiredStates
from fleet.errors import Conflict, FleetError, InvalidInput, NotFound
from fleet.policy.store import get_policy
from fleet.rollout.change import Change, ModelChange, PolicyChange
from fleet.rollout.members import target_devices, validate_target
from fleet.rollout.plan import LIVE, DeviceState, Phase, RolloutStatus
from fleet.rollout.spec import PolicyChangeSpec, RolloutSpec
from fleet.rollout.step import Step, assigner, busy_elsewhere, change_of, new_member, subject
from fleet.tables import Rollout, RolloutDevice
from models.wire import DesiredState

__all__ = ["RolloutEngine"]

log = logging.getLogger(__name__)


def _lock(session: Session, rollout_id: str) -> Rollout | None:
    return session.exec(
        select(Rollout).where(col(Rollout.id) == rollout_id).with_for_update(skip_locked=True)
    ).first()


def _step(db: Engine, rollout_id: str, now: datetime) -> list[DesiredState]:
    with Session(db) as session:
        row = _lock(session, rollout_id)
        if row is None or row.status not in LIVE:
            return []
        step = Step(session, row, now)
        step.run()
        if not step.write():
            session.rollback()
            return []
        session.commit()
        return step.states


class RolloutEngine:
    """Runs every live rollout forward, and carries out admins' actions on them."""

    def __init__(
        self,
        db: Engine,
        desired: DesiredStates,
        clock: Callable[[], datetime],
        *,
        interval_s: float = 2.0,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        self._db = db
        self._leads = leads  # the loop steps rollouts only while this replica leads
        self._desired = desired
        self._clock = clock
        self._interval_s = interval_s  # seconds between steps when nothing wakes the loop
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Step every live rollout, then wait for the interval or a wake-up; until cancelled."""
        while True:
            steps = asyncio.ensure_future(self._step_all_logged())
            try:
                await asyncio.shield(steps)
            except asyncio.CancelledError:
                # A step runs in a worker thread: let it end its transaction before the
                # app disposes of the database engine under it.
                await asyncio.wait([steps])
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()

    async def _step_all_logged(self) -> None:
        try:
            await self.step_all()
        except FleetError as exc:
            log.error("rollout step failed: %s", exc)
        except Exception:
            log.exception("rollout step failed")

    async def step_all(self) -> None:
        if not self._leads():
            return
        ids = await asyncio.to_thread(self._live_ids)
        for rollout_id in ids:
            await self.step(rollout_id)

    async def step(self, rollout_id: str) -> None:
        await self._desired.apply(partial(_step, self._db, rollout_id, self._clock()))

    def _live_ids(self) -> list[str]:
        with Session(self._db) as session:
            return list(
                session.exec(
                    select(Rollout.id)
                    .where(col(Rollout.status).in_([s.value for s in LIVE]))
                    .order_by(col(Rollout.created_at))
                ).all()
            )

    # -- admin actions ------------------------------------------------------------------

    async def create(self, spec: RolloutSpec, actor: str, source: str = "") -> str:
        """Validate against the fleet, store the rollout and its devices; its id."""
        rollout_id = await asyncio.to_thread(_create, self._db, spec, actor, self._clock(), source)
        self.wake()
        return rollout_id

    async def act(
        self, rollout_id: str, action: str, actor: str, reason: str = "", source: str = ""
    ) -> None:
        """``pause``, ``resume``, ``approve`` or ``abort``, audited; ``Conflict`` when it cannot."""
        work = partial(_act, self._db, rollout_id, action, actor, reason, self._clock(), source)
        await self._desired.apply(work)
        self.wake()


def _policy_change(session: Session, spec: RolloutSpec) -> Change[Any]:
    """The policy a new rollout sends, its version fixed; 422 naming the field when unknown."""
    assert isinstance(spec.change, PolicyChangeSpec)
    try:
        return change_of(session, spec)
    except NotFound:
        name, version = spec.change.policy, spec.change.version
        try:
            latest = get_policy(session, name)
        except NotFound:
            raise InvalidInput(f"no fallback policy {name!r}", field="change.policy") from None
        raise InvalidInput(
            f"fallback policy {name!r} has no version {version} (the latest is {latest.version})",
            field="change.version",
        ) from None


def _create(db: Engine, spec: RolloutSpec, actor: str, now: datetime, source: str) -> str:
    with Session(db) as session:
        validate_target(session, spec.target)
        devices = target_devices(session, spec.target)
        if not devices:
            raise InvalidInput(
                "matches no device (check the groups, tags, devices and facts filter)",
                field="target",
            )
        if isinstance(spec.change, PolicyChangeSpec):
            change = _policy_change(session, spec)
            assert isinstance(change, PolicyChange)
            # Stored with the version it sends: a newer version never changes this rollout.
            pinned = spec.change.model_copy(update={"version": change.version})
            spec = spec.model_copy(update={"change": pinned})
        else:
            change = change_of(session, spec)
        assign_to = assigner(session, spec, change, creating=True)
        busy = busy_elsewhere(session, "", change.key, [d.id for d in devices])
        if busy:
            other = sorted(set(busy.values()))[0]
            count = sum(1 for r in busy.values() if r == other)
            what = change.name if isinstance(change, ModelChange) else "the fallback policy"
            raise Conflict(
                f"rollout {other} is already changing {what} on {count} of these "
                "devices: wait for it to finish, or abort it"
            )
        rollout_id = "ro-" + secrets.token_hex(5)
        members = [new_member(rollout_id, d, assign_to(d), now) for d in devices]
        eligible = [m for m in members if m.state == DeviceState.PENDING]
        if not eligible:
            _refuse_ineligible(change, members)
        session.add(
            Rollout(
                id=rollout_id,
                name=spec.name,
                change_key=change.key,
                spec=spec.model_dump(mode="json"),
                status=RolloutStatus.ACTIVE.value,
                stage=0,
                phase=Phase.ROLLING.value,
                stage_started_at=now,
                gate_failures=[0] * len(spec.gates),
                created_by=actor,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        session.add_all(members)
        record(
            session,
            at=now,
            actor=actor,
            action="rollout.created",
            subject=subject(rollout_id),
            reason=f"{change.title} to {len(eligible)} device(s) "
            f"({len(members) - len(eligible)} ineligible)",
            data={"spec": spec.model_dump(mode="json")},
            source=source,
        )
        session.commit()
        return rollout_id


def _refuse_ineligible(change: Change[Any], members: list[RolloutDevice]) -> None:
    """No targeted device can take the change: 422 with each reason (and which devices)."""
    if isinstance(change, ModelChange):
        reasons = "; ".join(sorted({m.detail for m in members}))
        raise InvalidInput(
            f"no variant of {change.title} fits any targeted device: {reasons[:1500]}",
            field="change.version",
        )
    by_reason: dict[str, list[str]] = {}
    for member in members:
        by_reason.setdefault(member.detail, []).append(member.device_id)
    reasons = "; ".join(
        f"{', '.join(ids[:3])}{f' and {len(ids) - 3} more' if len(ids) > 3 else ''}: {why}"
        for why, ids in sorted(by_reason.items())
    )
    raise InvalidInput(
        f"no targeted device can enforce {change.title}: {reasons[:1500]}",
        field="change.policy",
    )


def _act(
    db: Engine,
    rollout_id: str,
    action: str,
    actor: str,
    reason: str,
    now: datetime,
    source: str,
) -> list[DesiredState]:
    with Session(db) as session:
        row = session.exec(
            select(Rollout).where(col(Rollout.id) == rollout_id).with_for_update()
        ).first()
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        status = RolloutStatus(row.status)
        if status not in LIVE:
            raise Conflict(f"rollout {rollout_id} is {status.value}: it cannot {action}")
        step = Step(session, row, now, source)
        why = reason or f"by {actor}"
        if action == "pause":
            if status is RolloutStatus.PAUSED:
                raise Conflict(f"rollout {rollout_id} is already paused")
            step.set(status=RolloutStatus.PAUSED.value)
            step.audit("paused", why, actor=actor)
        elif action == "resume":
            if status is not RolloutStatus.PAUSED:
                raise Conflict(f"rollout {rollout_id} is not paused")
            step.set(status=RolloutStatus.ACTIVE.value)
            step.audit("resumed", why, actor=actor)
        elif action == "approve":
            if row.phase != Phase.AWAITING_APPROVAL:
                raise Conflict(
                    f"rollout {rollout_id} is not waiting for approval (it is {row.phase})"
                )
            step.audit("approved", why, actor=actor, stage=row.stage + 1)
            step.advance(actor, f"approved by {actor}")
        elif action == "abort":
            step.abort(f"aborted by {actor}" + (f": {reason}" if reason else ""), actor)
        else:
            raise InvalidInput(f"unknown action {action!r}")
        if not step.write():
            raise Conflict(f"rollout {rollout_id} changed meanwhile; try again")
        session.commit()
        return step.states
