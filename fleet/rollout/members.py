"""Who a rollout targets, and what each of them gets: the device set and its variant.

A model rollout gives each device the variant of the version that fits it; a policy
rollout gives every device the same policy, and leaves out the devices that do not
serve a model the policy names (:func:`fleet.policy.eligibility.ineligible_reasons`).

The filter over reported facts and the variant choice are pure; the queries around
them are the thin shell. A rollout re-reads its target on every engine step, so a
device that joins the group (or starts to match the filter) mid-rollout joins it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, or_, select

from fleet.desired import desired_model_of, report_of
from fleet.errors import InvalidInput
from fleet.policy.eligibility import device_models, ineligible_reasons
from fleet.registry.variants import Chosen, candidate_of, choose_variant, normalise_arch
from fleet.rollout.spec import FactFilter, ModelChangeSpec, Target
from fleet.tables import Device, DeviceTag, Group, ModelArtifact
from models.device import DeviceReport
from models.policy import FallbackPolicy, PolicyRef
from models.wire import DesiredModel

__all__ = [
    "Assignment",
    "assign",
    "assign_policy",
    "live_artifacts",
    "matches_facts",
    "target_devices",
    "validate_target",
]


def matches_facts(facts: FactFilter, report: DeviceReport | None, agent_version: str) -> bool:
    """Whether a device's reported facts pass the filter; unknown facts never match."""
    wanted = facts.agent_version
    if (
        wanted is not None
        and agent_version != wanted
        and not agent_version.startswith(wanted.rstrip(".") + ".")
    ):
        return False
    hardware = facts.model_copy(update={"agent_version": None})
    if hardware.is_empty():
        return True
    if report is None:
        return False
    if facts.arch and normalise_arch(report.arch) not in {normalise_arch(a) for a in facts.arch}:
        return False
    if facts.min_ram_bytes is not None and report.ram_total_bytes < facts.min_ram_bytes:
        return False
    if facts.max_ram_bytes is not None and report.ram_total_bytes > facts.max_ram_bytes:
        return False
    return facts.gpu is None or facts.gpu == bool(report.gpus)


def validate_target(session: Session, target: Target) -> None:
    """Refuse names that do not exist, naming the field: a typo must not shrink a rollout."""
    for group in target.groups:
        if session.get(Group, group) is None:
            raise InvalidInput(f"no group {group!r}", field="target.groups")
    if target.devices:
        known = set(session.exec(select(Device.id).where(col(Device.id).in_(target.devices))).all())
        missing = sorted(set(target.devices) - known)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise InvalidInput(f"no device {', '.join(missing[:3])}{more}", field="target.devices")


def target_devices(session: Session, target: Target) -> list[Device]:
    """The non-revoked devices the target names, filtered by their reported facts."""
    named = []
    if target.groups:
        named.append(col(Device.group).in_(target.groups))
    if target.devices:
        named.append(col(Device.id).in_(target.devices))
    if target.tags:
        tagged = select(DeviceTag.device_id).where(col(DeviceTag.tag).in_(target.tags))
        named.append(col(Device.id).in_(tagged))
    query = select(Device).where(col(Device.revoked_at).is_(None))
    if named:
        query = query.where(or_(*named))
    devices = session.exec(query.order_by(col(Device.id))).all()
    if target.facts.is_empty():
        return list(devices)  # no report to parse: a step reads its target often
    return [d for d in devices if matches_facts(target.facts, report_of(d), d.agent_version)]


def live_artifacts(session: Session, change: ModelChangeSpec) -> list[ModelArtifact]:
    """The version's variants that may be sent: a yanked variant never is."""
    rows = session.exec(
        select(ModelArtifact).where(
            col(ModelArtifact.name) == change.model, col(ModelArtifact.version) == change.version
        )
    ).all()
    if not rows:
        known = session.exec(
            select(ModelArtifact.version).where(col(ModelArtifact.name) == change.model)
        ).all()
        if not known:
            raise InvalidInput(
                f"model {change.model!r} is not in the registry", field="change.model"
            )
        raise InvalidInput(
            f"model {change.model!r} has no version {change.version!r} "
            f"(it has {', '.join(sorted(set(known)))})",
            field="change.version",
        )
    live = [r for r in rows if r.yanked_at is None]
    if not live:
        reasons = "; ".join(sorted({r.yank_reason or "no reason given" for r in rows}))
        raise InvalidInput(
            f"{change.model} {change.version} is yanked ({reasons})", field="change.version"
        )
    return live


@dataclass(frozen=True)
class Assignment:
    """What one device gets: its target, or why it cannot get any."""

    entry: DesiredModel | PolicyRef | None  # None: ineligible
    variant: str | None
    placement: str | None
    reason: str  # why this variant, or why none fits


def assign(artifacts: Sequence[ModelArtifact], report: DeviceReport | None) -> Assignment:
    """The best variant of ``artifacts`` for a device, as the desired model it will be sent."""
    by_variant = {row.variant: row for row in artifacts}
    choice = choose_variant([candidate_of(row) for row in artifacts], report)
    if not isinstance(choice, Chosen):
        return Assignment(None, None, None, choice.summary)
    row = by_variant[choice.variant]
    entry = desired_model_of(row)
    return Assignment(entry, row.variant, choice.placement, choice.reason)


def assign_policy(policy: FallbackPolicy, ref: PolicyRef, device: Device) -> Assignment:
    """The policy for a device that serves every model it names; else why not."""
    reasons = ineligible_reasons(policy, device_models(device))
    if reasons:
        return Assignment(None, None, None, "; ".join(reasons))
    return Assignment(ref, None, None, f"has every model {ref.name} v{ref.version} names")
