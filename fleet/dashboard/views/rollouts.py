"""What the rollout pages show and read: the listing, the create form, progress and gates.

The listing is paged in SQL (live rollouts first, then the history a page at a time,
device counts grouped in the database for the rows shown). The create form is plain
fields (:func:`parse_form` turns them into the body of :class:`RolloutSpec`, validated
by the same model as the API, and :func:`form_field` says which field an error belongs
to, for the API's dotted names and pydantic's locations alike). The live view's stage
table and gate evidence are pure functions of the API's :class:`RolloutDetail`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.rollout.plan import LIVE, Phase, RolloutStatus, stage_names, stage_quotas
from fleet.rollout.spec import ModelChangeSpec, RolloutSpec
from fleet.rollout.views import (
    GateCheckPublic,
    RolloutDetail,
    StagePublic,
    audit_entries,
)
from fleet.tables import (
    GateCheckRow,
    Group,
    ModelArtifact,
    PolicyRow,
    Rollout,
    RolloutDevice,
    as_utc,
)

__all__ = [
    "ABORT_FIELDS",
    "ACTIONS",
    "DEVICE_STATES",
    "GATE_FIELDS",
    "Choice",
    "GateView",
    "Parsed",
    "RolloutRow",
    "StageRow",
    "actions_for",
    "change_choices",
    "change_title",
    "failed_devices",
    "form_field",
    "gate_views",
    "group_names",
    "history",
    "live_rollouts",
    "parse_form",
    "rollout_progress",
    "stage_rows",
    "target_text",
    "validate_form",
]

ACTIONS = ("pause", "resume", "approve", "abort")
DEVICE_STATES = ("pending", "queued", "updating", "updated", "failed", "timed_out", "rolled_back")
GATE_FIELDS = (
    "metric",
    "window_s",
    "min_samples",
    "max_increase_percent",
    "max_decrease_percent",
    "max_value",
    "min_value",
    "on_insufficient_data",
    "max_consecutive_failures",
)
ABORT_FIELDS = ("failure", "threshold_percent", "threshold_count", "min_devices")
_GIB = 2**30
_LIVE = [s.value for s in LIVE]
_FINISHED = [RolloutStatus.COMPLETED.value, RolloutStatus.ABORTED.value]


# -- the listing --------------------------------------------------------------------------


def change_title(spec: RolloutSpec) -> str:
    """The change for people: ``gemma3 2.0``, ``policy edge-default v2``."""
    change = spec.change
    if isinstance(change, ModelChangeSpec):
        return f"{change.model} {change.version}"
    return f"policy {change.policy} v{change.version}"


def _names(label: str, names: Sequence[str], most: int = 3) -> str:
    more = f" +{len(names) - most}" if len(names) > most else ""
    return f"{label} {', '.join(names[:most])}{more}"


def target_text(spec: RolloutSpec) -> str:
    """The target for people: ``groups lab, edge · tags eu · arch aarch64 · >= 8 GiB``."""
    target, facts = spec.target, spec.target.facts
    parts = [
        _names(label, names)
        for label, names in (
            ("groups", target.groups),
            ("tags", target.tags),
            ("devices", target.devices),
            ("arch", facts.arch),
        )
        if names
    ]
    if facts.min_ram_bytes is not None:
        parts.append(f">= {facts.min_ram_bytes / _GIB:g} GiB")
    if facts.max_ram_bytes is not None:
        parts.append(f"<= {facts.max_ram_bytes / _GIB:g} GiB")
    if facts.gpu is not None:
        parts.append("with a GPU" if facts.gpu else "without a GPU")
    if facts.agent_version is not None:
        parts.append(f"agent {facts.agent_version}")
    return " · ".join(parts) or "every device"


@dataclass(frozen=True)
class RolloutRow:
    """A rollout in the listing."""

    id: str
    name: str
    change: str
    target: str
    status: str
    stage: int
    stage_name: str
    stages: int
    phase: str
    devices: dict[str, int]  # state -> count
    reason: str
    created_by: str
    created_at: datetime
    finished_at: datetime | None

    @property
    def total(self) -> int:
        return sum(self.devices.values())

    @property
    def done(self) -> int:
        """Devices in a final state (ineligible devices are not counted anywhere)."""
        return sum(self.devices.get(s, 0) for s in ("updated", "failed", "timed_out"))

    @property
    def eligible(self) -> int:
        return self.total - self.devices.get("ineligible", 0)


def _rows(session: Session, rollouts: Sequence[Rollout]) -> list[RolloutRow]:
    counted = session.exec(
        select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
        .where(col(RolloutDevice.rollout_id).in_([r.id for r in rollouts]))
        .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.state))
    ).all()
    counts: dict[str, dict[str, int]] = {}
    for rollout_id, state, count in counted:
        counts.setdefault(rollout_id, {})[state] = int(count)
    rows = []
    for r in rollouts:
        spec = RolloutSpec.model_validate(r.spec)
        names = stage_names(spec)
        rows.append(
            RolloutRow(
                id=r.id,
                name=r.name,
                change=change_title(spec),
                target=target_text(spec),
                status=r.status,
                stage=r.stage,
                stage_name=names[min(r.stage, len(names) - 1)],
                stages=len(names),
                phase=r.phase,
                devices=counts.get(r.id, {}),
                reason=r.reason,
                created_by=r.created_by,
                created_at=as_utc(r.created_at) or r.created_at,
                finished_at=as_utc(r.finished_at),
            )
        )
    return rows


def live_rollouts(session: Session, limit: int = 200) -> list[RolloutRow]:
    """Active and paused rollouts, newest first."""
    query = (
        select(Rollout)
        .where(col(Rollout.status).in_(_LIVE))
        .order_by(col(Rollout.created_at).desc(), col(Rollout.id))
        .limit(limit)
    )
    return _rows(session, session.exec(query).all())


def history(session: Session, page: int, per_page: int) -> tuple[list[RolloutRow], int]:
    """One page (from 1) of completed and aborted rollouts, newest first, and how many."""
    finished = col(Rollout.status).in_(_FINISHED)
    total = session.exec(select(func.count()).select_from(Rollout).where(finished)).one()
    query = (
        select(Rollout)
        .where(finished)
        .order_by(col(Rollout.created_at).desc(), col(Rollout.id))
        .offset((max(page, 1) - 1) * per_page)
        .limit(per_page)
    )
    return _rows(session, session.exec(query).all()), int(total)


# -- the create form ----------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One option of the form's change list."""

    value: str  # "model|gemma3|2.0", "policy|edge-default|3", "policy|edge-default|" (latest)
    label: str


def change_choices(session: Session, limit: int = 200) -> dict[str, list[Choice]]:
    """What a rollout can send: the registry's live versions, newest first, and the policies."""
    versions = session.exec(
        select(ModelArtifact.name, ModelArtifact.version, func.max(ModelArtifact.created_at))
        .where(col(ModelArtifact.yanked_at).is_(None))
        .group_by(col(ModelArtifact.name), col(ModelArtifact.version))
        .order_by(func.max(ModelArtifact.created_at).desc(), col(ModelArtifact.name))
        .limit(limit)
    ).all()
    policies = session.exec(
        select(PolicyRow.name, PolicyRow.version)
        .order_by(col(PolicyRow.name), col(PolicyRow.version).desc())
        .limit(limit)
    ).all()
    models = [Choice(f"model|{n}|{v}", f"{n} {v}") for n, v, _ in versions]
    named: list[Choice] = []
    for name, version in policies:
        if not named or not named[-1].value.startswith(f"policy|{name}|"):
            named.append(Choice(f"policy|{name}|", f"{name} (latest, v{version})"))
        named.append(Choice(f"policy|{name}|{version}", f"{name} v{version}"))
    return {"Model versions": models, "Fallback policies": named}


def group_names(session: Session, limit: int = 500) -> list[str]:
    return list(session.exec(select(Group.name).order_by(col(Group.name)).limit(limit)).all())


@dataclass
class Parsed:
    """The form as a spec body, what could not even be read, and which rows went where."""

    body: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)  # form field -> message
    gate_rows: list[int] = field(default_factory=list)  # gates[i] came from row gate_rows[i]
    abort_rows: list[int] = field(default_factory=list)


def _split(text: str) -> list[str]:
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


def _rows_of(form: Mapping[str, str], prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in form if (m := re.fullmatch(rf"{prefix}-(\d{{1,2}})-\w+", k))}
    return sorted(found)


def _gib(form: Mapping[str, str], name: str, errors: dict[str, str]) -> int | None:
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        errors[name] = f"{text!r} is not a number of GiB"
        return None
    if not 0 <= value <= 1_000_000:
        errors[name] = "give a size between 0 and 1,000,000 GiB"
        return None
    return int(value * _GIB)


def _change(form: Mapping[str, str], errors: dict[str, str]) -> dict[str, Any] | None:
    kind, _, rest = form.get("change", "").partition("|")
    name, _, version = rest.partition("|")
    if kind == "model" and name and version:
        return {"model": name, "version": version}
    if kind == "policy" and name:
        return {"kind": "policy", "policy": name, "version": version or None}
    errors["change"] = "choose a model version or a fallback policy"
    return None


def _target(form: Mapping[str, str], errors: dict[str, str]) -> dict[str, Any]:
    target: dict[str, Any] = {}
    for name in ("groups", "tags", "devices"):
        values = _split(form.get(f"target_{name}", ""))
        if values:
            target[name] = values
    facts: dict[str, Any] = {}
    arch = _split(form.get("facts_arch", ""))
    if arch:
        facts["arch"] = arch
    for bound in ("min", "max"):
        size = _gib(form, f"facts_{bound}_ram_gib", errors)
        if size is not None:
            facts[f"{bound}_ram_bytes"] = size
    gpu = form.get("facts_gpu", "")
    if gpu in ("yes", "no"):
        facts["gpu"] = gpu == "yes"
    if form.get("facts_agent_version", "").strip():
        facts["agent_version"] = form["facts_agent_version"].strip()
    if facts:
        target["facts"] = facts
    return target


def _stages(form: Mapping[str, str]) -> dict[str, Any]:
    if form.get("stages_kind") == "exponential":
        return {
            "kind": "exponential",
            "start_per_minute": form.get("exp_start", "").strip() or None,
            "factor": form.get("exp_factor", "").strip() or None,
            "max_per_minute": form.get("exp_max", "").strip() or None,
        }
    return {"kind": "waves", "percents": _split(form.get("waves", "")) or ["100"]}


def _row(form: Mapping[str, str], prefix: str, index: int, names: Sequence[str]) -> dict[str, str]:
    return {n: v for n in names if (v := form.get(f"{prefix}-{index}-{n}", "").strip())}


def parse_form(form: Mapping[str, str]) -> Parsed:
    """The create form's fields as a :class:`RolloutSpec` body (not yet validated)."""
    errors: dict[str, str] = {}
    body: dict[str, Any] = {"name": form.get("name", "").strip()}
    change = _change(form, errors)
    if change is not None:
        body["change"] = change
    body["target"] = _target(form, errors)
    canary_kind = form.get("canary_kind", "")
    if canary_kind in ("count", "percent"):
        size = form.get("canary_value", "").strip()
        if size:
            body["canary"] = {canary_kind: size}
        else:
            errors["canary"] = f"give the canary's {canary_kind}, or choose no canary"
    body["stages"] = _stages(form)
    for name in ("soak_s", "check_interval_s", "device_timeout_s", "max_concurrent"):
        if form.get(name, "").strip():
            body[name] = form[name].strip()
    body["approval"] = form.get("approval", "") in ("on", "true", "1")
    start, end = form.get("window_start", "").strip(), form.get("window_end", "").strip()
    if start or end:
        body["maintenance_window"] = {
            "start": start,
            "end": end,
            "timezone": form.get("window_timezone", "").strip() or "UTC",
        }
    parsed = Parsed(body, errors)
    gates, rules = [], []
    for index in _rows_of(form, "gate"):
        gate = _row(form, "gate", index, GATE_FIELDS)
        if gate.get("metric"):
            gates.append(gate)
            parsed.gate_rows.append(index)
    for index in _rows_of(form, "abort"):
        rule = _row(form, "abort", index, ABORT_FIELDS)
        if rule.get("threshold_percent") or rule.get("threshold_count"):
            rules.append(rule)
            parsed.abort_rows.append(index)
    body["gates"], body["abort_rules"] = gates, rules
    return parsed


_TOP = {"name", "soak_s", "check_interval_s", "device_timeout_s", "max_concurrent", "approval"}
_FACTS = {
    "arch": "facts_arch",
    "min_ram_bytes": "facts_min_ram_gib",
    "max_ram_bytes": "facts_max_ram_gib",
    "gpu": "facts_gpu",
    "agent_version": "facts_agent_version",
}
_RATE = {"start_per_minute": "exp_start", "factor": "exp_factor", "max_per_minute": "exp_max"}


def form_field(where: Sequence[int | str] | str | None, parsed: Parsed) -> str:
    """The form field an error belongs to: from pydantic's location or a dotted API field."""
    loc: list[int | str] = (
        [int(p) if p.isdigit() else p for p in where.split(".")]
        if isinstance(where, str)
        else list(where or [])
    )
    head, rest = (str(loc[0]), loc[1:]) if loc else ("", [])
    if head == "target":
        if not rest:
            return "target"
        if rest[0] == "facts":
            return _FACTS.get(str(rest[1]), "target") if len(rest) > 1 else "target"
        return f"target_{rest[0]}"
    if head == "stages":
        if len(rest) >= 2:
            return "waves" if rest[0] == "waves" else _RATE.get(str(rest[1]), "stages")
        return "stages"
    if head == "maintenance_window":
        return f"window_{rest[0]}" if rest else "window"
    if head in ("gates", "abort_rules"):
        prefix, rows = (
            ("gate", parsed.gate_rows) if head == "gates" else ("abort", parsed.abort_rows)
        )
        if rest and isinstance(rest[0], int) and rest[0] < len(rows):
            row = rows[rest[0]]
            return f"{prefix}-{row}-{rest[1]}" if len(rest) > 1 else f"{prefix}-{row}"
        return f"{prefix}s"
    if head in ("change", "canary"):
        return head
    return head if head in _TOP else "form"


def validate_form(parsed: Parsed) -> tuple[RolloutSpec | None, dict[str, str]]:
    """The spec, validated by the API's model, or the errors by form field (first wins)."""
    errors = dict(parsed.errors)
    try:
        spec = RolloutSpec.model_validate(parsed.body)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            errors.setdefault(form_field(error["loc"], parsed), message)
        return None, errors
    return (None, errors) if errors else (spec, {})


# -- the live view ------------------------------------------------------------------------


def _change_fields(spec: RolloutSpec) -> dict[str, Any]:
    change = spec.change
    if isinstance(change, ModelChangeSpec):
        return {"kind": "model", "model": change.model, "version": change.version,
                "policy": None, "policy_version": None}  # fmt: skip
    return {"kind": "policy", "model": None, "version": None,
            "policy": change.policy, "policy_version": change.version}  # fmt: skip


def rollout_progress(session: Session, row: Rollout, checks: int = 50) -> RolloutDetail:
    """The API's :func:`fleet.rollout.views.rollout_detail`, its devices counted in SQL.

    The same answer (a test compares them) without loading the rollout's device rows,
    so the live view, refreshed on every change, costs the same for 10 devices and
    10,000.
    """
    spec = RolloutSpec.model_validate(row.spec)
    names = stage_names(spec)
    by_stage: dict[int | None, dict[str, int]] = {}
    counted = session.exec(
        select(RolloutDevice.stage, RolloutDevice.state, func.count())
        .where(col(RolloutDevice.rollout_id) == row.id)
        .group_by(col(RolloutDevice.stage), col(RolloutDevice.state))
    ).all()
    devices: dict[str, int] = {}
    for stage, state, count in counted:
        by_stage.setdefault(stage, {})[state] = int(count)
        devices[state] = devices.get(state, 0) + int(count)
    failed = session.exec(
        select(RolloutDevice.failure, func.count())
        .where(
            col(RolloutDevice.rollout_id) == row.id,
            col(RolloutDevice.state) == "failed",
            col(RolloutDevice.failure).is_not(None),
        )
        .group_by(col(RolloutDevice.failure))
    ).all()
    quotas = stage_quotas(spec, sum(devices.values()) - devices.get("ineligible", 0))
    gate_rows = session.exec(
        select(GateCheckRow)
        .where(col(GateCheckRow.rollout_id) == row.id)
        .order_by(col(GateCheckRow.id).desc())
        .limit(checks)
    ).all()
    return RolloutDetail(
        id=row.id,
        name=row.name,
        change=change_title(spec),
        **_change_fields(spec),
        status=row.status,
        stage=row.stage,
        stage_name=names[min(row.stage, len(names) - 1)],
        stages=len(names),
        phase=row.phase,
        devices=devices,
        reason=row.reason,
        created_by=row.created_by,
        created_at=as_utc(row.created_at) or row.created_at,
        updated_at=as_utc(row.updated_at) or row.updated_at,
        finished_at=as_utc(row.finished_at),
        spec=row.spec,
        stage_progress=[
            StagePublic(index=i, name=name, quota=quotas[i], devices=by_stage.get(i, {}))
            for i, name in enumerate(names)
        ],
        failures={str(kind): int(n) for kind, n in failed}
        | {"timed_out": devices.get("timed_out", 0)},
        gate_checks=[
            GateCheckPublic(
                stage=c.stage,
                gate=c.gate,
                at=as_utc(c.at) or c.at,
                verdict=c.verdict,
                decision=c.decision,
                reasons=c.reasons,
                evidence=c.evidence,
            )
            for c in gate_rows
        ],
        audit=audit_entries(session, f"rollout:{row.id}", limit=100),
    )


@dataclass(frozen=True)
class StageRow:
    """One stage: its devices by state, those it has yet to release counted as pending."""

    index: int
    name: str
    quota: int  # released once done, cumulative
    share: int  # this stage's own devices
    counts: dict[str, int]  # DEVICE_STATES -> devices
    current: bool
    done: int  # devices in a final state

    @property
    def percent_done(self) -> int:
        return round(100 * self.done / self.share) if self.share else 100


def stage_rows(detail: RolloutDetail) -> list[StageRow]:
    """Each stage's devices by state; a stage's unreleased share is its ``pending``."""
    rows = []
    live = detail.status in _LIVE
    for stage in detail.stage_progress:
        before = detail.stage_progress[stage.index - 1].quota if stage.index > 0 else 0
        share = max(stage.quota - before, 0)
        released = sum(stage.devices.values())
        counts = {s: stage.devices.get(s, 0) for s in DEVICE_STATES}
        counts["pending"] += max(share - released, 0)
        done = sum(counts[s] for s in ("updated", "failed", "timed_out"))
        rows.append(
            StageRow(
                index=stage.index,
                name=stage.name,
                quota=stage.quota,
                share=max(share, released),
                counts=counts,
                current=live and stage.index == detail.stage,
                done=done,
            )
        )
    return rows


def _number(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if percent:
        return f"{value:+.1f}%"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"  # 30,245, not 3.024e+04


@dataclass(frozen=True)
class GateView:
    """A gate's latest check in a stage: its numbers beside its thresholds."""

    gate: int
    metric: str
    at: datetime
    verdict: str  # pass, fail, insufficient
    decision: str  # pass, wait, fail, abort
    reasons: list[str]
    updated: str  # "123.4 (40 samples, 3 devices)"
    baseline: str
    control: str
    change: str  # "+3.1% vs baseline, -0.5% vs control"
    thresholds: str  # "max +10% · max 0.05"
    min_samples: int
    checks: int  # checks of this gate in this stage among the latest shown

    @property
    def badge(self) -> str:
        return {"pass": "ok", "fail": "bad"}.get(self.verdict, "warn")


def _cohort(part: Any) -> str:
    if not isinstance(part, dict):
        return "-"
    bits = [f"{part.get('samples', 0)} samples"]
    if part.get("devices") is not None:
        bits.append(f"{part['devices']} devices")
    return f"{_number(part.get('value'))} ({', '.join(bits)})"


def _thresholds(limits: Any) -> str:
    if not isinstance(limits, dict):
        return "-"
    labels = {
        "max_increase_percent": "at most +{}%",
        "max_decrease_percent": "at most -{}%",
        "max_value": "at most {}",
        "min_value": "at least {}",
    }
    shown = [labels[k].format(f"{v:g}") for k, v in limits.items() if k in labels and v is not None]
    return " · ".join(shown) or "-"


def gate_views(detail: RolloutDetail) -> dict[int, list[GateView]]:
    """Each stage's latest check of each gate (the detail lists checks newest first)."""
    latest: dict[tuple[int, int], GateView] = {}
    counted: dict[tuple[int, int], int] = {}
    for check in detail.gate_checks:
        key = (check.stage, check.gate)
        counted[key] = counted.get(key, 0) + 1
        if key in latest:
            continue
        evidence = check.evidence
        changes = evidence.get("change_percent") or {}
        latest[key] = GateView(
            gate=check.gate,
            metric=str(evidence.get("metric", "?")),
            at=check.at,
            verdict=check.verdict,
            decision=check.decision,
            reasons=check.reasons,
            updated=_cohort(evidence.get("updated")),
            baseline=_cohort(evidence.get("baseline")),
            control=_cohort(evidence.get("control")),
            change=", ".join(f"{_number(v, True)} vs {k}" for k, v in sorted(changes.items()))
            or "-",
            thresholds=_thresholds(evidence.get("thresholds")),
            min_samples=int(evidence.get("min_samples") or 0),
            checks=0,
        )
    by_stage: dict[int, list[GateView]] = {}
    for (stage, gate), view in sorted(latest.items()):
        by_stage.setdefault(stage, []).append(replace(view, checks=counted[(stage, gate)]))
    return by_stage


def actions_for(status: str, phase: str) -> list[str]:
    """The actions the engine would accept now (it refuses the others with a 409)."""
    if status == RolloutStatus.ACTIVE:
        shown = ["pause", "abort"]
    elif status == RolloutStatus.PAUSED:
        shown = ["resume", "abort"]
    else:
        return []
    if phase == Phase.AWAITING_APPROVAL:
        shown.insert(0, "approve")
    return shown


def failed_devices(
    session: Session, rollout_id: str, limit: int = 50
) -> tuple[list[RolloutDevice], int]:
    """The rollout's failed and timed-out devices, latest first, and how many there are."""
    failed = (
        col(RolloutDevice.rollout_id) == rollout_id,
        col(RolloutDevice.state).in_(["failed", "timed_out"]),
    )
    total = session.exec(select(func.count()).select_from(RolloutDevice).where(*failed)).one()
    rows = session.exec(
        select(RolloutDevice)
        .where(*failed)
        .order_by(col(RolloutDevice.since).desc(), col(RolloutDevice.device_id))
        .limit(limit)
    ).all()
    return list(rows), int(total)
