"""The data a gate reads, gathered from telemetry and events that already flow.

For a gate's window ending now: the updated devices' samples since their update, the
same devices' samples in the window before their change was issued (their baseline),
and the samples of the target's devices not yet changed (the control group), plus the
restarts and out-of-memory failures in each. The only I/O of the gates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from fleet.db import in_chunks
from fleet.rollout.gates import Cohort, Sample
from fleet.rollout.plan import DeviceState
from fleet.rollout.spec import FailureKind
from fleet.tables import EventRow, RolloutDevice, TelemetryRow, as_utc
from models.wire import EventKind

__all__ = ["Cohorts", "gather"]


@dataclass
class _Pool:
    samples: list[Sample] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    restarts: int = 0
    ooms: int = 0

    def cohort(self, golden: tuple[int, int] = (0, 0)) -> Cohort:
        return Cohort(
            samples=self.samples,
            devices=len(self.devices),
            restarts=self.restarts,
            ooms=self.ooms,
            golden_passed=golden[0],
            golden_failed=golden[1],
        )


@dataclass(frozen=True)
class Cohorts:
    """What one gate check compares: updated, their baseline, the control group."""

    updated: Cohort
    baseline: Cohort
    control: Cohort
    per_device: dict[str, tuple[Cohort, Cohort]]  # updated device -> (after, before)


def _sample(row: TelemetryRow) -> Sample:
    return Sample(
        requests=row.requests,
        errors=row.errors,
        p95_ms=row.latency_p95_ms,
        ttft_ms=row.ttft_p50_ms,
        tokens_per_s=row.tokens_per_s,
        fallbacks=row.fallbacks,
    )


_FAILURES = {EventKind.MODEL_FAILED, EventKind.UPDATE_FAILED, EventKind.UPDATE_ROLLED_BACK}


def _is_oom(event: EventRow) -> bool:
    """A model that did not load for lack of memory: a failed load, swap or health check."""
    text = f"{event.message} {(event.data or {}).get('reason', '')}".lower()
    return event.kind in _FAILURES and "memory" in text


def gather(
    session: Session, members: Sequence[RolloutDevice], window_s: float, now: datetime
) -> Cohorts:
    """Read the three cohorts for a gate whose window is ``window_s`` seconds, ending now."""
    window = timedelta(seconds=window_s)
    # Every device that serves the new version, a device failed by a gate included:
    # leaving it out would hide the regression from the next check of the same gate.
    updated = {
        m.device_id: m
        for m in members
        if m.state == DeviceState.UPDATED or m.failure == FailureKind.GATE_FAILED
    }
    control = {m.device_id for m in members if m.state in (DeviceState.PENDING, DeviceState.QUEUED)}
    issued = [as_utc(m.issued_at) for m in updated.values() if m.issued_at is not None]
    start = min([now - window, *[t - window for t in issued if t is not None]])
    ids = [*updated, *control]
    after: dict[str, _Pool] = defaultdict(_Pool)
    before: dict[str, _Pool] = defaultdict(_Pool)
    rest = _Pool()

    def pool_of(device_id: str, ts: datetime) -> _Pool | None:
        member = updated.get(device_id)
        if member is not None:
            changed = as_utc(member.issued_at) or now
            since = max(as_utc(member.since) or changed, now - window)
            if ts >= since:
                return after[device_id]
            if changed - window <= ts < changed:
                return before[device_id]
            return None
        return rest if ts >= now - window else None

    for chunk in in_chunks(ids):
        rows = session.exec(
            select(TelemetryRow).where(
                col(TelemetryRow.device_id).in_(chunk), col(TelemetryRow.ts) >= start
            )
        ).all()
        for row in rows:
            pool = pool_of(row.device_id, as_utc(row.ts) or now)
            if pool is not None:
                pool.samples.append(_sample(row))
                pool.devices.add(row.device_id)
        events = session.exec(
            select(EventRow).where(
                col(EventRow.device_id).in_(chunk),
                col(EventRow.ts) >= start,
                col(EventRow.kind).in_([EventKind.ONLINE.value, *(k.value for k in _FAILURES)]),
            )
        ).all()
        for event in events:
            pool = pool_of(event.device_id, as_utc(event.ts) or now)
            if pool is None:
                continue
            pool.devices.add(event.device_id)
            if event.kind == EventKind.ONLINE:
                pool.restarts += 1
            elif _is_oom(event):
                pool.ooms += 1
    golden = (
        len(updated),
        sum(1 for m in members if m.failure == FailureKind.HEALTH_CHECK_FAILED),
    )
    merged_after, merged_before = _Pool(), _Pool()
    for device_id in updated:
        for merged, pool in ((merged_after, after[device_id]), (merged_before, before[device_id])):
            merged.samples.extend(pool.samples)
            merged.devices.add(device_id)
            merged.restarts += pool.restarts
            merged.ooms += pool.ooms
    rest.devices = control
    return Cohorts(
        updated=merged_after.cohort(golden),
        baseline=merged_before.cohort(),
        control=rest.cohort(),
        per_device={d: (after[d].cohort(), before[d].cohort()) for d in updated},
    )
