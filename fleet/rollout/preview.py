"""What a rollout would do before it starts: devices per stage, who is left out and why.

A preview runs the engine's own choices, not copies of them: the target's devices
(:func:`fleet.rollout.members.target_devices`), each device's variant or policy
(:func:`fleet.rollout.step.assigner`, whose answer
:func:`~fleet.rollout.step.new_member` stores as ``pending``, or as ``ineligible`` when
it has no entry for the device), the devices another live rollout holds
(:func:`~fleet.rollout.step.busy_elsewhere`) and the stage quotas
(:func:`fleet.rollout.plan.stage_quotas`). So the counts shown are the counts
:meth:`fleet.rollout.engine.RolloutEngine.create` stores, for the fleet as it is now;
which devices form the canary is decided by the rollout's id, so it is not shown.

:func:`preview_rollout` is the thin shell (it reads, never writes); :func:`stage_plan`
and :func:`summarize` are pure. Errors are the engine's: ``InvalidInput`` naming the
field for a target or change that create would refuse as a 422. What create would
refuse for the fleet's state instead (no eligible device, a rival rollout) is the
preview's ``refusal``, shown beside the numbers that explain it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session

from fleet.desired import report_of
from fleet.errors import InvalidInput, NotFound
from fleet.policy.store import get_policy
from fleet.rollout.change import Change, ModelChange
from fleet.rollout.members import Assignment, target_devices, validate_target
from fleet.rollout.plan import allowed_released, in_window, stage_names, stage_quotas
from fleet.rollout.spec import ExponentialRate, PolicyChangeSpec, RolloutSpec
from fleet.rollout.step import assigner, busy_elsewhere, change_of
from fleet.tables import Device

__all__ = [
    "INELIGIBLE_SHOWN",
    "Excluded",
    "Preview",
    "StagePlan",
    "preview_rollout",
    "release_minutes",
    "stage_plan",
    "summarize",
]

INELIGIBLE_SHOWN = 200  # a preview lists this many ineligible devices, and counts the rest


@dataclass(frozen=True)
class StagePlan:
    """One stage: how many devices it releases, and how many are released once it is done."""

    index: int
    name: str  # "canary", "10%", "exponential"
    devices: int  # released by this stage
    cumulative: int  # released once it is done (the engine's quota)
    minutes: int | None = None  # an exponential stage: minutes its rate takes to release them


@dataclass(frozen=True)
class Excluded:
    """A targeted device that the rollout will not change, and why."""

    device_id: str
    reason: str


@dataclass(frozen=True)
class Preview:
    """What creating the rollout now would store."""

    change: str  # "gemma3 2.0", "policy edge-default v2"
    targeted: int  # devices the target matches
    eligible: int  # of those, devices the rollout will change
    stages: list[StagePlan]
    ineligible: list[Excluded]  # the first INELIGIBLE_SHOWN, by device id
    ineligible_count: int
    variants: dict[str, int]  # "Q4_K_M (gpu)" -> eligible devices given it
    outside_window: int  # eligible devices outside the maintenance window right now
    refusal: str | None  # why creating it now would be refused; None: it would start


def release_minutes(spec: RolloutSpec, stage: int, quotas: Sequence[int]) -> int:
    """Minutes the engine's rate needs to release the stage's quota (its first minute is 1)."""
    if quotas[stage] <= (quotas[stage - 1] if stage > 0 else 0):
        return 0
    low, high = 0, max(quotas[stage], 1)  # it releases at least one device a minute
    while low < high:  # the first elapsed minute at which the whole quota is allowed
        mid = (low + high) // 2
        if allowed_released(spec, stage, quotas, mid * 60.0) >= quotas[stage]:
            high = mid
        else:
            low = mid + 1
    return low + 1


def stage_plan(spec: RolloutSpec, eligible: int) -> list[StagePlan]:
    """Each stage's share of ``eligible`` devices, as the engine releases them."""
    quotas = stage_quotas(spec, eligible)
    plans = []
    for index, name in enumerate(stage_names(spec)):
        before = quotas[index - 1] if index > 0 else 0
        rate = isinstance(spec.stages, ExponentialRate) and index == len(quotas) - 1
        plans.append(
            StagePlan(
                index=index,
                name=name,
                devices=quotas[index] - before,
                cumulative=quotas[index],
                minutes=release_minutes(spec, index, quotas) if rate else None,
            )
        )
    return plans


def summarize(
    spec: RolloutSpec,
    change: str,
    assigned: Sequence[tuple[str, Assignment]],
    *,
    outside_window: int = 0,
    refusal: str | None = None,
) -> Preview:
    """The preview of each targeted device's assignment, by device id (pure).

    A device with an entry is eligible (``new_member`` stores it ``pending``); one
    without is ineligible, its assignment's reason the why.
    """
    eligible = [a for _, a in assigned if a.entry is not None]
    left_out = sorted((d, a.reason) for d, a in assigned if a.entry is None)
    variants = Counter(
        f"{a.variant} ({a.placement})" if a.placement else str(a.variant)
        for a in eligible
        if a.variant is not None
    )
    if not eligible and refusal is None:
        refusal = "no targeted device can take the change (see the reasons below)"
    return Preview(
        change=change,
        targeted=len(assigned),
        eligible=len(eligible),
        stages=stage_plan(spec, len(eligible)),
        ineligible=[Excluded(d, reason) for d, reason in left_out[:INELIGIBLE_SHOWN]],
        ineligible_count=len(left_out),
        variants=dict(sorted(variants.items())),
        outside_window=outside_window,
        refusal=refusal,
    )


def _change(session: Session, spec: RolloutSpec) -> Change[Any]:
    """The change the engine would send; an unknown policy or version is a 422 naming it."""
    try:
        return change_of(session, spec)
    except NotFound as exc:
        assert isinstance(spec.change, PolicyChangeSpec)
        try:
            get_policy(session, spec.change.policy)
        except NotFound:
            raise InvalidInput(str(exc), field="change.policy") from None
        raise InvalidInput(str(exc), field="change.version") from None


def _busy(session: Session, change: Change[Any], devices: Sequence[Device]) -> str | None:
    busy = busy_elsewhere(session, "", change.key, [d.id for d in devices])
    if not busy:
        return None
    other = sorted(set(busy.values()))[0]
    count = sum(1 for r in busy.values() if r == other)
    what = change.name if isinstance(change, ModelChange) else "the fallback policy"
    return (
        f"rollout {other} is already changing {what} on {count} of these devices: "
        "wait for it to finish, or abort it"
    )


def preview_rollout(session: Session, spec: RolloutSpec, now: datetime) -> Preview:
    """What :meth:`~fleet.rollout.engine.RolloutEngine.create` would store now; reads only."""
    validate_target(session, spec.target)
    devices = target_devices(session, spec.target)
    if not devices:
        raise InvalidInput(
            "matches no device (check the groups, tags, devices and facts filter)",
            field="target",
        )
    change = _change(session, spec)
    assign_to = assigner(session, spec, change, creating=True)
    assigned = [(d.id, assign_to(d)) for d in devices]
    eligible = {d for d, a in assigned if a.entry is not None}
    outside = 0
    if spec.maintenance_window is not None:
        for device in devices:
            if device.id in eligible:
                report = report_of(device)
                zone = report.timezone if report is not None else None
                outside += not in_window(spec.maintenance_window, zone, now)
    return summarize(
        spec,
        change.title,
        assigned,
        outside_window=outside,
        refusal=_busy(session, change, devices),
    )
