"""One step of one rollout, inside one transaction: observe, decide, collect what to write.

The engine (:mod:`fleet.rollout.engine`) opens the transaction, locks the rollout's row
and commits; a :class:`Step` reads the rollout's devices, moves them on with the pure
decisions of :mod:`fleet.rollout.plan` and :mod:`fleet.rollout.gates`, stores the
desired states it changes (:func:`fleet.desired.store_desired`) and the audit entries
that explain them, and holds the rollout row's new values until :meth:`Step.write`
writes them at the revision read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from fleet.audit import ENGINE, record
from fleet.db import in_chunks
from fleet.desired import (
    assigned_policies,
    desired_model_of,
    desired_of,
    report_of,
    store_desired_many,
)
from fleet.errors import InvalidInput, NotFound
from fleet.policy.store import get_policy
from fleet.rollout.change import Change, ModelChange, Parts, PolicyChange
from fleet.rollout.evidence import Cohorts, gather
from fleet.rollout.gates import check_gate
from fleet.rollout.members import (
    Assignment,
    assign,
    assign_policy,
    live_artifacts,
    target_devices,
)
from fleet.rollout.plan import (
    CHANGED,
    FINISHED,
    LIVE,
    DeviceState,
    Phase,
    RolloutStatus,
    abort_reason,
    allowed_released,
    device_rank,
    in_window,
    judge_device,
    stage_count,
    stage_names,
    stage_quotas,
)
from fleet.rollout.spec import FailureKind, Gate, ModelChangeSpec, PolicyChangeSpec, RolloutSpec
from fleet.tables import (
    Device,
    EventRow,
    GateCheckRow,
    ModelArtifact,
    Rollout,
    RolloutDevice,
    as_utc,
)
from models.policy import FallbackPolicy
from models.wire import DesiredModel, DesiredState, ReportedState

__all__ = [
    "Assigner",
    "Step",
    "assigner",
    "busy_elsewhere",
    "change_of",
    "new_member",
    "subject",
]

Assigner = Callable[[Device], Assignment]  # what one device of the target gets


def change_of(session: Session, spec: RolloutSpec) -> Change[Any]:
    """The spec's change; a policy's body read from the store (the latest without a version).

    ``NotFound`` when the policy (or that version of it) is not stored.
    """
    change = spec.change
    if isinstance(change, ModelChangeSpec):
        return ModelChange(change.model, change.version)
    row = get_policy(session, change.policy, change.version)
    return PolicyChange(row.name, row.version, dict(row.body), row.digest)


def assigner(
    session: Session, spec: RolloutSpec, change: Change[Any], *, creating: bool = False
) -> Assigner:
    """What each device gets: its variant of the model, or the policy if it can enforce it.

    Creating, a version that cannot be sent is refused (``InvalidInput`` naming the field);
    later, one yanked since makes the devices that join ineligible.
    """
    if isinstance(change, PolicyChange):
        policy = FallbackPolicy.model_validate(change.body)
        ref = change.ref
        return lambda device: assign_policy(policy, ref, device)
    assert isinstance(spec.change, ModelChangeSpec)
    if creating:
        artifacts = live_artifacts(session, spec.change)
    else:
        try:
            artifacts = live_artifacts(session, spec.change)
        except InvalidInput:
            artifacts = []  # yanked since: devices that join now are ineligible
    if not artifacts:
        return lambda device: Assignment(None, None, None, "the version has no live variant")
    return lambda device: assign(artifacts, report_of(device))


def subject(rollout_id: str) -> str:
    return f"rollout:{rollout_id}"


@dataclass(frozen=True)
class _Extras:
    """The parts of a desired state besides the models: its config as it was, the fallback."""

    config: dict[str, Any]
    fallback: dict[str, Any]


class Step:
    """One step of one rollout inside one transaction; collects what to write."""

    def __init__(self, session: Session, row: Rollout, now: datetime, source: str = "") -> None:
        self.session = session
        self.row = row
        self.now = now
        self.source = source  # where a person's action came from; "" for the engine's
        self.spec = RolloutSpec.model_validate(row.spec)
        self.gone: str | None = None  # why the change can no longer be sent
        try:
            self.change: Change[Any] = change_of(session, self.spec)
        except NotFound as exc:
            assert isinstance(self.spec.change, PolicyChangeSpec)
            # Deleted since: still enough to restore what was there, which is all an abort needs.
            self.change = PolicyChange(
                self.spec.change.policy, self.spec.change.version or 1, {}, ""
            )
            self.gone = str(exc)
        self.updates: dict[str, Any] = {}
        self.states: list[DesiredState] = []  # stored by write(); published after the commit
        self._stores: dict[str, tuple[RolloutDevice, Parts]] = {}
        self.members = list(
            session.exec(select(RolloutDevice).where(col(RolloutDevice.rollout_id) == row.id)).all()
        )
        ids = [m.device_id for m in self.members]
        self.devices = {
            d.id: d
            for chunk in in_chunks(ids)
            for d in session.exec(select(Device).where(col(Device.id).in_(chunk))).all()
        }

    # -- helpers --------------------------------------------------------------------

    def get(self, field: str) -> Any:
        return self.updates.get(field, getattr(self.row, field))

    def set(self, **values: Any) -> None:
        self.updates.update(values)

    def audit(self, action: str, reason: str = "", actor: str = ENGINE, **data: Any) -> None:
        record(
            self.session,
            at=self.now,
            actor=actor,
            action=f"rollout.{action}",
            subject=subject(self.row.id),
            reason=reason,
            data=data,
            source=self.source if actor != ENGINE else "",
        )

    def move(
        self,
        member: RolloutDevice,
        state: DeviceState,
        detail: str,
        failure: FailureKind | None = None,
    ) -> None:
        member.state = state.value
        member.detail = detail[:2000]
        member.failure = failure.value if failure is not None else member.failure
        member.since = self.now
        self.session.add(member)

    def _store(self, member: RolloutDevice, parts: Parts) -> bool:
        """Queue the device's next desired parts; :meth:`write` stores them all at once."""
        device = self.devices.get(member.device_id)
        if device is None or device.revoked_at is not None:
            return False
        self._stores[device.id] = (member, parts)
        return True

    def _store_queued(self) -> None:
        wanted = []
        for device_id, (_member, parts) in self._stores.items():
            current = desired_of(self.devices[device_id])
            extras = _Extras(current.config if current is not None else {}, parts.fallback)
            wanted.append((device_id, list(parts.models), extras))
        self.states = store_desired_many(self.session, wanted, self.now)
        versions = {state.device_id: state.version for state in self.states}
        for device_id, (member, _parts) in self._stores.items():
            member.desired_version = versions.get(device_id)
            self.session.add(member)

    def _current(self, member: RolloutDevice) -> Parts:
        """The device's desired parts; with none set yet, the models it reports serving.

        A device that never had a desired state runs its local configuration; its first
        one must keep the models the rollout does not change, not drop them, and carry the
        fallback policy assigned to it, as any first desired state does.
        """
        if member.device_id in self._stores:
            return self._stores[member.device_id][1]
        device = self.devices.get(member.device_id)
        current = desired_of(device) if device is not None else None
        if current is not None:
            return Parts(tuple(current.models), dict(current.fallback))
        reported = self._reported(member)
        served = reported.models if reported is not None else []
        assigned = (
            assigned_policies(self.session, [device]).get(device.id) if device is not None else None
        )
        return Parts(
            tuple(DesiredModel(name=m.name) for m in served if m.state == "ready"),
            dict(assigned.body) if assigned is not None else {},
        )

    def _reported(self, member: RolloutDevice) -> ReportedState | None:
        device = self.devices.get(member.device_id)
        if device is None or not device.reported:
            return None
        try:
            return ReportedState.model_validate(device.reported)
        except ValueError:
            return None

    # -- the step -------------------------------------------------------------------

    def run(self) -> None:
        if self.gone is not None:
            self.abort(f"{self.change.title} can no longer be sent: {self.gone}", ENGINE)
            return
        self.refresh_members()
        self.observe()
        if self.check_abort_rules():
            return
        if self.get("status") == RolloutStatus.PAUSED:
            return
        if self.get("phase") == Phase.ROLLING:
            self.release()
        self.issue()  # also devices that joined a stage already soaking
        if self.get("phase") == Phase.ROLLING:
            self.finish_installs()
        if self.get("phase") == Phase.SOAKING:
            self.soak()

    def refresh_members(self) -> None:
        """Add devices that joined the target; one live rollout per change per device."""
        known = {m.device_id for m in self.members}
        joined = [d for d in target_devices(self.session, self.spec.target) if d.id not in known]
        if not joined:
            return
        busy = busy_elsewhere(self.session, self.row.id, self.change.key, [d.id for d in joined])
        joined = [d for d in joined if d.id not in busy]
        if not joined:
            return
        assign_to = assigner(self.session, self.spec, self.change)
        stage = self.get("stage")
        released = stage > 0 or self.spec.canary is None
        for device in joined:
            member = new_member(self.row.id, device, assign_to(device), self.now)
            if member.state == DeviceState.PENDING and released:
                member.state, member.stage = DeviceState.QUEUED.value, stage
                member.detail = f"joined the target during stage {stage}: released into it"
            self.session.add(member)
            self.members.append(member)
            self.devices[device.id] = device
        self.audit(
            "devices_joined", f"{len(joined)} device(s) joined the target", count=len(joined)
        )

    def observe(self) -> None:
        """Move updating devices on, by what they reported and the events they sent."""
        watched = [
            m
            for m in self.members
            if m.state in (DeviceState.UPDATING, DeviceState.TIMED_OUT) and m.target is not None
        ]
        if not watched:
            return
        events = _events(self.session, watched, self.change.events)
        for member in watched:
            assert member.target is not None
            seen = self.change.observe(
                self.change.entry_of(member.target),
                self._reported(member),
                events.get(member.device_id, []),
                member.issued_at,
            )
            since = as_utc(member.since) or self.now
            moved = judge_device(
                DeviceState(member.state), seen, since, self.now, self.spec.device_timeout_s
            )
            if moved is None:
                continue
            state, failure, detail = moved
            self.move(member, state, detail, failure)
            if failure is not None:
                self.audit("device_failed", detail, device=member.device_id, failure=failure.value)

    def check_abort_rules(self) -> bool:
        finished = [
            m for m in self.members if m.state in FINISHED and m.state != DeviceState.INELIGIBLE
        ]
        failures: dict[FailureKind, int] = {}
        for member in finished:
            if member.failure is not None and member.state != DeviceState.UPDATED:
                kind = FailureKind(member.failure)
                failures[kind] = failures.get(kind, 0) + 1
        reason = abort_reason(self.spec.abort_rules, failures, len(finished))
        if reason is None:
            return False
        self.abort(reason, ENGINE)
        return True

    def abort(self, reason: str, actor: str) -> None:
        """Restore every device this rollout changed to what it had before, and stop."""
        restored = []
        for member in self.members:
            if member.state not in CHANGED:
                continue
            self._store(member, self.change.restore(self._current(member), member.previous))
            previous = self.change.restored(member.previous)
            self.move(member, DeviceState.ROLLED_BACK, f"rollout aborted: restored {previous}")
            restored.append(member.device_id)
        self.set(status=RolloutStatus.ABORTED.value, reason=reason, finished_at=self.now)
        self.audit(
            "aborted",
            f"{reason}; {len(restored)} device(s) rolled back to their previous "
            + ("model" if isinstance(self.change, ModelChange) else "fallback policy"),
            actor=actor,
            rolled_back=len(restored),
            devices=restored[:100],
        )

    def release(self) -> None:
        """Release devices into the current stage, up to its quota (or its rate)."""
        eligible = [m for m in self.members if m.state != DeviceState.INELIGIBLE]
        stage = self.get("stage")
        quotas = stage_quotas(self.spec, len(eligible))
        elapsed = (self.now - (as_utc(self.get("stage_started_at")) or self.now)).total_seconds()
        allowed = allowed_released(self.spec, stage, quotas, elapsed)
        released = sum(1 for m in eligible if m.stage is not None)
        pending = sorted(
            (m for m in eligible if m.state == DeviceState.PENDING), key=lambda m: m.rank
        )
        for member in pending[: max(0, allowed - released)]:
            member.stage = stage
            self.move(member, DeviceState.QUEUED, f"released in stage {stage}")

    def issue(self) -> None:
        """Give queued devices the change: within the concurrency cap and their window."""
        cap = self.spec.max_concurrent
        busy = sum(
            1 for m in self.members if m.state == DeviceState.UPDATING and self._online(m.device_id)
        )
        queued = sorted(
            (m for m in self.members if m.state == DeviceState.QUEUED), key=lambda m: m.rank
        )
        for member in queued:
            if cap is not None and busy >= cap:
                break
            report = report_of(self.devices[member.device_id])
            zone = report.timezone if report is not None else None
            if not in_window(self.spec.maintenance_window, zone, self.now):
                continue
            self._issue(member)
            if member.state == DeviceState.UPDATING and self._online(member.device_id):
                busy += 1

    def _online(self, device_id: str) -> bool:
        device = self.devices.get(device_id)
        return device is not None and device.online

    def _issue(self, member: RolloutDevice) -> None:
        assert member.target is not None
        entry = self.change.entry_of(member.target)
        desired = desired_of(self.devices[member.device_id])
        captured = (
            self.change.capture(Parts(tuple(desired.models), dict(desired.fallback)))
            if desired is not None
            else None
        )
        if captured is None and isinstance(entry, DesiredModel):
            captured = _previous_from_reported(self.session, self._reported(member), entry.name)
        member.previous = captured
        if not self._store(member, self.change.apply(self._current(member), entry)):
            self.move(member, DeviceState.INELIGIBLE, "revoked during the rollout")
            return
        member.issued_at = self.now
        if self.change.satisfied(entry, self._reported(member)):
            self.move(member, DeviceState.UPDATED, f"already ran {self.change.title}")
        else:
            self.move(member, DeviceState.UPDATING, f"its desired state names {self.change.title}")

    def _installs_done(self) -> bool:
        """Every device the stage should have released was, and each one is final."""
        eligible = [m for m in self.members if m.state != DeviceState.INELIGIBLE]
        quota = stage_quotas(self.spec, len(eligible))[self.get("stage")]
        released = [m for m in eligible if m.stage is not None]
        return len(released) >= quota and all(m.state in FINISHED for m in released)

    def finish_installs(self) -> None:
        stage = self.get("stage")
        if not self._installs_done():
            return
        released = [m for m in self.members if m.stage is not None]
        self.set(phase=Phase.SOAKING.value, soak_started_at=self.now, next_check_at=self.now)
        updated = sum(1 for m in released if m.state == DeviceState.UPDATED)
        self.audit(
            "stage_installed",
            f"stage {stage} ({self.stage_name(stage)}): every released device finished "
            f"({updated} of {len(released)} updated); soaking {self.spec.soak_s:g} s",
            stage=stage,
        )

    def stage_name(self, stage: int) -> str:
        return stage_names(self.spec)[stage]

    def soak(self) -> None:
        """Check the gates while the stage soaks; move on when the soak ends and they pass."""
        next_check = as_utc(self.get("next_check_at")) or self.now
        soak_start = as_utc(self.get("soak_started_at")) or self.now
        soak_end = soak_start + timedelta(seconds=self.spec.soak_s)
        if self.now < next_check or not self._installs_done():
            return  # (a device that joined while the stage soaked is updating)
        passed = self.check_gates()
        if self.get("status") == RolloutStatus.ABORTED:
            return
        later = self.now + timedelta(seconds=self.spec.check_interval_s)
        if self.now < soak_end:
            self.set(next_check_at=min(later, soak_end))  # always one check at the soak's end
            return
        self.set(next_check_at=later)
        if not passed:
            return
        stage = self.get("stage")
        if stage == stage_count(self.spec) - 1:
            self.set(status=RolloutStatus.COMPLETED.value, finished_at=self.now)
            self.audit("completed", f"every stage passed; the last was {self.stage_name(stage)}")
        elif self.spec.approval:
            self.set(phase=Phase.AWAITING_APPROVAL.value)
            self.audit(
                "awaiting_approval",
                f"stage {stage} ({self.stage_name(stage)}) passed; "
                f"stage {stage + 1} waits for an admin's approval",
                stage=stage,
            )
        else:
            self.advance(ENGINE, f"stage {stage} ({self.stage_name(stage)}) passed its gates")

    def advance(self, actor: str, reason: str) -> None:
        stage = self.get("stage") + 1
        self.set(
            stage=stage,
            phase=Phase.ROLLING.value,
            stage_started_at=self.now,
            soak_started_at=None,
            next_check_at=None,
            gate_failures=[0] * len(self.spec.gates),
        )
        self.audit(
            "stage_started",
            f"{reason}; stage {stage} ({self.stage_name(stage)}) starts",
            actor=actor,
            stage=stage,
        )

    def check_gates(self) -> bool:
        """Check every gate now, store each check; True when all of them pass."""
        stage = self.get("stage")
        streaks = list(self.get("gate_failures") or [0] * len(self.spec.gates))
        streaks += [0] * (len(self.spec.gates) - len(streaks))
        all_pass = True
        for index, gate in enumerate(self.spec.gates):
            cohorts = gather(self.session, self.members, gate.window_s, self.now)
            result = check_gate(gate, cohorts.updated, cohorts.baseline, cohorts.control)
            self._fail_devices(index, gate, cohorts)
            failed = result.verdict == "fail" or (
                result.verdict == "insufficient" and gate.on_insufficient_data == "fail"
            )
            if failed:
                streaks[index] += 1
            elif result.verdict == "pass":
                streaks[index] = 0  # waiting for data neither breaks nor extends a streak
            if failed and streaks[index] >= gate.max_consecutive_failures:
                decision = "abort"
            elif failed:
                decision = "fail"
            else:
                decision = "pass" if result.verdict == "pass" else "wait"
            all_pass = all_pass and decision == "pass"
            self.session.add(
                GateCheckRow(
                    rollout_id=self.row.id,
                    stage=stage,
                    gate=index,
                    at=self.now,
                    verdict=result.verdict,
                    decision=decision,
                    reasons=result.reasons,
                    evidence=result.evidence,
                )
            )
            if decision == "abort":
                self.set(gate_failures=streaks)
                why = "; ".join(result.reasons)
                self.abort(
                    f"gate {index} ({gate.metric.value}) failed {streaks[index]} consecutive "
                    f"check(s): {why}",
                    ENGINE,
                )
                return False
        self.set(gate_failures=streaks)
        return all_pass

    def _fail_devices(self, index: int, gate: Gate, cohorts: Cohorts) -> None:
        """A device whose own numbers fail the gate counts as ``gate_failed``."""
        for device_id, (after, before) in cohorts.per_device.items():
            result = check_gate(gate, after, before, cohorts.control)
            if result.verdict != "fail":
                continue
            member = next(m for m in self.members if m.device_id == device_id)
            if member.state != DeviceState.UPDATED:
                continue  # failed by an earlier check
            detail = f"gate {index} ({gate.metric.value}): " + "; ".join(result.reasons)
            self.move(member, DeviceState.FAILED, detail, FailureKind.GATE_FAILED)
            self.audit(
                "device_failed", detail, device=device_id, failure=FailureKind.GATE_FAILED.value
            )

    def write(self) -> bool:
        """Store the queued desired states, then the rollout row at the revision read.

        False when another writer moved the rollout first: the caller rolls back.
        """
        if self._stores:
            self._store_queued()
        values = {**self.updates, "revision": self.row.revision + 1, "updated_at": self.now}
        written = self.session.exec(
            update(Rollout)
            .where(col(Rollout.id) == self.row.id, col(Rollout.revision) == self.row.revision)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return written.rowcount == 1


def new_member(
    rollout_id: str, device: Device, assignment: Assignment, now: datetime
) -> RolloutDevice:
    eligible = assignment.entry is not None
    return RolloutDevice(
        rollout_id=rollout_id,
        device_id=device.id,
        rank=device_rank(rollout_id, device.id),
        state=(DeviceState.PENDING if eligible else DeviceState.INELIGIBLE).value,
        variant=assignment.variant,
        placement=assignment.placement,
        target=(assignment.entry.model_dump(mode="json") if assignment.entry is not None else None),
        detail=assignment.reason,
        since=now,
    )


def busy_elsewhere(
    session: Session, rollout_id: str, key: str, device_ids: Sequence[str]
) -> dict[str, str]:
    """Devices of ``device_ids`` that another live rollout of the same change holds."""
    busy: dict[str, str] = {}
    for chunk in in_chunks(device_ids):
        rows = session.exec(
            select(RolloutDevice.device_id, Rollout.id)
            .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
            .where(
                col(Rollout.change_key) == key,
                col(Rollout.status).in_([s.value for s in LIVE]),
                col(Rollout.id) != rollout_id,
                col(RolloutDevice.device_id).in_(chunk),
                col(RolloutDevice.state).not_in(
                    [DeviceState.INELIGIBLE.value, DeviceState.ROLLED_BACK.value]
                ),
            )
        ).all()
        busy.update({device_id: other for device_id, other in rows})
    return busy


def _events(
    session: Session, members: Sequence[RolloutDevice], kinds: frozenset[str]
) -> dict[str, list[EventRow]]:
    """The events of these kinds the members sent since the first of them was issued."""
    issued = [as_utc(m.issued_at) for m in members if m.issued_at is not None]
    since = min((t for t in issued if t is not None), default=None)
    found: dict[str, list[EventRow]] = {}
    for chunk in in_chunks([m.device_id for m in members]):
        query = select(EventRow).where(
            col(EventRow.device_id).in_(chunk), col(EventRow.kind).in_(sorted(kinds))
        )
        if since is not None:
            query = query.where(col(EventRow.stored_at) >= since)
        for event in session.exec(query).all():
            found.setdefault(event.device_id, []).append(event)
    return found


def _previous_from_reported(
    session: Session, reported: ReportedState | None, name: str
) -> dict[str, Any] | None:
    """What a device with no desired entry for the model served: its artifact, if registered."""
    if reported is None:
        return None
    for model in reported.models:
        if model.name != name:
            continue
        if model.sha256 is not None:
            row = session.exec(
                select(ModelArtifact).where(
                    col(ModelArtifact.name) == name, col(ModelArtifact.sha256) == model.sha256
                )
            ).first()
            if row is not None:
                return desired_model_of(row).model_dump(mode="json")
        if model.version is not None:
            return DesiredModel(name=name, version=model.version).model_dump(mode="json")
    return None
