"""The rollout's decisions, as pure functions: who goes when, who is done, when to stop.

Nothing here reads the database, the broker or the clock; the engine
(:mod:`fleet.rollout.engine`) gathers the facts, calls these and writes what they
return, so every decision can be tested on plain values and repeated safely.

A device moves through these states (``DeviceState``)::

    pending ─release─► queued ─slot, window─► updating ──► updated
                                                 │  ╲
                                                 │   ╲─► failed (install, health, gate)
                                                 ╰─► timed_out ─(reports it late)─► updated
    ineligible: no variant fits (a policy: the device lacks a model it names);
                never a failure, never changed
    rolled_back: the rollout was aborted and its previous model restored

A device is ``updated`` only when it reports that it serves the new target and its
health check passed (an ``update_healthy`` event for that target), never when a
download finished; for a fallback policy, when it reports the policy's digest.
Every waiting state has a bound: ``updating`` and its ``device_timeout_s`` (offline
devices included), ``queued`` its maintenance window, ``pending`` the stages before it.
``timed_out``, ``failed``, ``updated`` and ``ineligible`` are final for a stage, so an
offline device never holds a wave back; it is still updated when it returns while the
rollout is active.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet.rollout.spec import (
    AbortRule,
    ExponentialRate,
    FailureKind,
    MaintenanceWindow,
    RolloutSpec,
    Waves,
)

__all__ = [
    "FINISHED",
    "DeviceState",
    "Observation",
    "Phase",
    "RolloutStatus",
    "abort_reason",
    "allowed_released",
    "device_rank",
    "in_window",
    "judge_device",
    "stage_count",
    "stage_names",
    "stage_quotas",
]


class RolloutStatus(StrEnum):
    """A rollout's life: live (active or paused), then completed or aborted."""

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


LIVE = frozenset({RolloutStatus.ACTIVE, RolloutStatus.PAUSED})


class Phase(StrEnum):
    """Where the current stage stands."""

    ROLLING = "rolling"  # releasing devices and waiting for their installs
    SOAKING = "soaking"  # every install finished; gates are checked until the soak ends
    AWAITING_APPROVAL = "awaiting_approval"  # gates passed; an admin must approve the next


class DeviceState(StrEnum):
    """Where one device stands in a rollout (the diagram above)."""

    PENDING = "pending"
    QUEUED = "queued"
    UPDATING = "updating"
    UPDATED = "updated"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INELIGIBLE = "ineligible"
    ROLLED_BACK = "rolled_back"


FINISHED = frozenset(
    {DeviceState.UPDATED, DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.INELIGIBLE}
)
CHANGED = frozenset(
    {DeviceState.UPDATING, DeviceState.UPDATED, DeviceState.FAILED, DeviceState.TIMED_OUT}
)  # the rollout issued them a desired state: an abort restores their previous model


def device_rank(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random order, so canaries are a fair sample and a restart picks the same."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()[:16]


def stage_count(spec: RolloutSpec) -> int:
    waves = len(spec.stages.percents) if spec.stages.kind == "waves" else 1
    return waves + (1 if spec.canary is not None else 0)


def stage_names(spec: RolloutSpec) -> list[str]:
    names = ["canary"] if spec.canary is not None else []
    if spec.stages.kind == "waves":
        names += [f"{p:g}%" for p in spec.stages.percents]
    else:
        names.append("exponential")
    return names


def stage_quotas(spec: RolloutSpec, eligible: int) -> list[int]:
    """How many eligible devices each stage has released, cumulatively, once it is done."""
    quotas: list[int] = []
    canary = spec.canary
    if canary is not None and canary.count is not None:
        quotas.append(min(canary.count, eligible))
    elif canary is not None and canary.percent is not None:
        quotas.append(_share(eligible, canary.percent))
    if isinstance(spec.stages, Waves):
        quotas += [_share(eligible, percent) for percent in spec.stages.percents]
    else:
        quotas.append(eligible)
    running = 0
    for i, quota in enumerate(quotas):  # a later stage never releases fewer than an earlier one
        running = max(running, quota)
        quotas[i] = running
    return quotas


def _share(eligible: int, percent: float) -> int:
    """A percent of the devices, rounded up, at least one (when there is one)."""
    exact = round(eligible * percent / 100, 9)  # 3000 * 1.1 / 100 is 33.000000000000004
    return min(eligible, max(1, math.ceil(exact)))


def allowed_released(
    spec: RolloutSpec, stage: int, quotas: Sequence[int], stage_elapsed_s: float
) -> int:
    """How many devices may be released by now: the stage's quota, or the rate's allowance.

    An exponential stage releases ``start_per_minute`` in its first minute, then
    ``factor`` times more each minute, up to ``max_per_minute``, on top of what the
    stages before it released.
    """
    quota = quotas[stage]
    rate = spec.stages
    if not isinstance(rate, ExponentialRate) or stage != len(quotas) - 1:
        return quota
    before = quotas[stage - 1] if stage > 0 else 0
    minutes = int(max(stage_elapsed_s, 0) // 60) + 1
    released, per_minute = 0, float(min(rate.start_per_minute, rate.max_per_minute))
    for _ in range(minutes):
        released += int(per_minute)
        if before + released >= quota:
            return quota
        per_minute = min(per_minute * rate.factor, rate.max_per_minute)
    return before + released


@dataclass(frozen=True)
class Observation:
    """What the engine saw of one updating device since the rollout issued it the target."""

    serves_target: bool  # its reported state runs the target, ready
    healthy: bool  # it sent update_healthy for the target (or already served it when issued)
    install_failed: str | None = None  # update_failed for the target (not superseded): reason
    health_failed: str | None = None  # update_rolled_back for the target: reason
    rejected: str | None = None  # policy_rejected since the policy was issued: reason
    success: str = "serves the new version and passed its health check"  # the detail when updated


def judge_device(
    state: DeviceState, seen: Observation, since: datetime, now: datetime, timeout_s: float
) -> tuple[DeviceState, FailureKind | None, str] | None:
    """The next state of an updating (or timed-out) device; None when nothing changed."""
    if state not in (DeviceState.UPDATING, DeviceState.TIMED_OUT):
        return None
    if seen.serves_target and seen.healthy:
        late = " (after it had timed out)" if state is DeviceState.TIMED_OUT else ""
        return DeviceState.UPDATED, None, f"{seen.success}{late}"
    if state is DeviceState.TIMED_OUT:
        return None
    if seen.rejected is not None:
        return DeviceState.FAILED, FailureKind.POLICY_REJECTED, seen.rejected
    if seen.health_failed is not None:
        return DeviceState.FAILED, FailureKind.HEALTH_CHECK_FAILED, seen.health_failed
    if seen.install_failed is not None:
        return DeviceState.FAILED, FailureKind.INSTALL_FAILED, seen.install_failed
    if now - since >= timedelta(seconds=timeout_s):
        return (
            DeviceState.TIMED_OUT,
            FailureKind.TIMED_OUT,
            f"no healthy report of the new version within {timeout_s:g} s",
        )
    return None


def abort_reason(
    rules: Iterable[AbortRule], failures: dict[FailureKind, int], finished: int
) -> str | None:
    """Why the rollout must abort, or None: the first rule whose threshold is reached.

    ``finished`` counts the devices that reached a final state other than ineligible
    (updated, failed, timed out): the denominator of percentages and what
    ``min_devices`` waits for.
    """
    for rule in rules:
        if finished < rule.min_devices:
            continue
        if rule.failure == "any":
            count, label = sum(failures.values()), "failed"
        else:
            count, label = failures.get(rule.failure, 0), rule.failure.value
        if rule.threshold_count is not None and count >= rule.threshold_count:
            return (
                f"abort rule: {count} device(s) {label}, threshold {rule.threshold_count} "
                f"({finished} finished)"
            )
        if rule.threshold_percent is not None and count * 100 >= rule.threshold_percent * finished:
            share = count * 100 / finished
            return (
                f"abort rule: {count} of {finished} finished device(s) {label} ({share:.1f}%), "
                f"threshold {rule.threshold_percent:g}%"
            )
    return None


def in_window(window: MaintenanceWindow | None, device_zone: str | None, now: datetime) -> bool:
    """Whether ``now`` falls in the window, in the device's time zone (else the window's)."""
    if window is None:
        return True
    zone = _zone(device_zone) or ZoneInfo(window.timezone)
    local = now.astimezone(zone).time().replace(second=0, microsecond=0)
    start, end = window.bounds()
    return _between(local, start, end)


def _between(local: time, start: time, end: time) -> bool:
    if start < end:
        return start <= local < end
    return local >= start or local < end  # wraps midnight


def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    # A folder of zones ("Europe") is IsADirectoryError when zones come from the tzdata
    # package rather than the system's files.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None
