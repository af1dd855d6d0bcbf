"""What an admin asks of a rollout: the change, the target, the stages, the gates, the rules.

Every field is validated here, before anything is stored, so a bad request is a 422
naming the field and nothing changes. Shapes follow the tools admins already know:
stages and abort rules as AWS IoT Jobs has them (waves or an exponential rate; a failure
kind, a threshold, a minimum number of devices), gates as Argo Rollouts' analysis (a
metric, a window, a minimum sample count, a condition), with two additions: what to do
when there is not enough data, and a limit of consecutive failed checks.
"""

from __future__ import annotations

import re
from datetime import time
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from models.values import ModelName, Version

__all__ = [
    "AbortRule",
    "Canary",
    "ChangeSpec",
    "ExponentialRate",
    "FactFilter",
    "FailureKind",
    "Gate",
    "MaintenanceWindow",
    "Metric",
    "ModelChangeSpec",
    "PolicyChangeSpec",
    "RolloutSpec",
    "Target",
    "Waves",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}$"  # group, tag and device names share this shape


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class FactFilter(_Spec):
    """A filter over what devices reported; every stated field must match."""

    arch: list[str] = Field(default_factory=list, max_length=8)  # any of these
    min_ram_bytes: int | None = Field(default=None, ge=0)
    max_ram_bytes: int | None = Field(default=None, ge=0)
    gpu: bool | None = None  # True: has an NVIDIA GPU; False: has none
    agent_version: str | None = Field(
        default=None, max_length=64
    )  # "0.4" matches 0.4 and 0.4.x, not 0.41

    def is_empty(self) -> bool:
        return (
            not self.arch
            and self.gpu is None
            and self.agent_version is None
            and (self.min_ram_bytes is None and self.max_ram_bytes is None)
        )


class Target(_Spec):
    """Which devices the rollout changes: the union of groups, tags and devices, then filtered."""

    groups: list[Annotated[str, Field(pattern=_NAME)]] = Field(default_factory=list, max_length=64)
    tags: list[Annotated[str, Field(pattern=_NAME)]] = Field(default_factory=list, max_length=64)
    devices: list[Annotated[str, Field(pattern=_NAME)]] = Field(
        default_factory=list, max_length=100_000
    )
    facts: FactFilter = Field(default_factory=FactFilter)  # alone, it selects from every device

    @model_validator(mode="after")
    def _not_empty(self) -> Target:
        if not (self.groups or self.tags or self.devices) and self.facts.is_empty():
            raise ValueError("the target is empty: name groups, tags, devices or a facts filter")
        return self


class Canary(_Spec):
    """The first stage: a few devices, by count or by percent of the target."""

    count: int | None = Field(default=None, ge=1)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one(self) -> Canary:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a canary is a count or a percent, exactly one of them")
        return self


class Waves(_Spec):
    """Stages after the canary, as cumulative percents of the target: [10, 50, 100]."""

    kind: Literal["waves"] = "waves"
    percents: list[float] = Field(min_length=1, max_length=32)

    @field_validator("percents")
    @classmethod
    def _ascending_to_100(cls, value: list[float]) -> list[float]:
        if any(p <= 0 or p > 100 for p in value):
            raise ValueError("each wave is a cumulative percent in (0, 100]")
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"waves are cumulative and must grow: {value}")
        if value[-1] != 100:
            raise ValueError(f"the last wave must reach 100 percent, not {value[-1]}")
        return value


class ExponentialRate(_Spec):
    """After the canary, release devices at a rate that grows each minute (AWS IoT Jobs)."""

    kind: Literal["exponential"] = "exponential"
    start_per_minute: int = Field(ge=1, le=100_000)
    factor: float = Field(gt=1, le=5)
    max_per_minute: int = Field(ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _cap(self) -> ExponentialRate:
        if self.max_per_minute < self.start_per_minute:
            raise ValueError("max_per_minute must be at least start_per_minute")
        return self


class Metric(StrEnum):
    """What a gate measures; all from telemetry and events that already flow."""

    P95_LATENCY_MS = "p95_latency_ms"
    TTFT_MS = "ttft_ms"
    TOKENS_PER_S = "tokens_per_s"
    ERROR_RATE = "error_rate"  # errors / requests, 0..1
    RESTARTS = "restarts"  # agent restarts (online events) per device in the window
    OOM = "oom"  # out-of-memory model failures per device in the window
    FALLBACK_RATE = "fallback_rate"  # requests a fallback tier answered / requests
    GOLDEN_FAILURE_RATE = "golden_failure_rate"  # health checks failed / health checks run


class Gate(_Spec):
    """A check on one metric of the updated devices, against their baseline and the rest.

    ``max_increase_percent`` and ``max_decrease_percent`` compare with the same devices
    before the update and with the target's devices not yet updated, over the same window;
    ``max_value`` and ``min_value`` are absolute. At least one condition is required.
    """

    metric: Metric
    window_s: float = Field(default=300, gt=0, le=7 * 86_400)
    min_samples: int = Field(default=3, ge=1, le=1_000_000)
    max_increase_percent: float | None = Field(default=None, ge=0, le=10_000)
    max_decrease_percent: float | None = Field(default=None, ge=0, le=100)
    max_value: float | None = Field(default=None, ge=0)
    min_value: float | None = Field(default=None, ge=0)
    on_insufficient_data: Literal["wait", "fail"] = "wait"
    max_consecutive_failures: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _has_condition(self) -> Gate:
        limits = (self.max_increase_percent, self.max_decrease_percent)
        if all(v is None for v in (*limits, self.max_value, self.min_value)):
            raise ValueError(
                "a gate needs a condition: max_increase_percent, max_decrease_percent, "
                "max_value or min_value"
            )
        if self.metric in _RATES and self.max_value is not None and self.max_value > 1:
            raise ValueError(f"{self.metric.value} is a fraction: max_value must be in [0, 1]")
        return self


_RATES = {Metric.ERROR_RATE, Metric.FALLBACK_RATE, Metric.GOLDEN_FAILURE_RATE}


class FailureKind(StrEnum):
    """Why a device counts as failed in a rollout."""

    INSTALL_FAILED = "install_failed"  # the agent refused or could not install the target
    HEALTH_CHECK_FAILED = "health_check_failed"  # golden prompts failed; the agent rolled back
    GATE_FAILED = "gate_failed"  # it serves the new version, and its own metrics fail a gate
    TIMED_OUT = "timed_out"  # it did not report the new version in time (offline included)
    POLICY_REJECTED = "policy_rejected"  # the agent refused the fallback policy it was sent


class AbortRule(_Spec):
    """Abort when enough devices failed this way (AWS IoT Jobs' abort criteria)."""

    failure: FailureKind | Literal["any"] = "any"
    threshold_percent: float | None = Field(default=None, gt=0, le=100)
    threshold_count: int | None = Field(default=None, ge=1)
    min_devices: int = Field(default=1, ge=1)  # devices finished before the rule may fire

    @model_validator(mode="after")
    def _one_threshold(self) -> AbortRule:
        if (self.threshold_percent is None) == (self.threshold_count is None):
            raise ValueError("an abort rule has a threshold_percent or a threshold_count")
        return self


_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class MaintenanceWindow(_Spec):
    """Hours of the device's local day when it may update; may wrap midnight (22:00-04:00)."""

    start: str = Field(pattern=_CLOCK.pattern)  # "HH:MM"
    end: str = Field(pattern=_CLOCK.pattern)
    timezone: str = "UTC"  # for devices that did not report theirs

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("a maintenance window needs different start and end times")
        return self

    def bounds(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


def _stage_kind(value: object) -> str:
    """Waves unless it says otherwise, so ``{"percents": [...]}`` is enough."""
    if isinstance(value, dict):
        return str(value.get("kind", "waves"))
    return str(getattr(value, "kind", "waves"))


class ModelChangeSpec(_Spec):
    """The change: serve this version of this model (the variant is chosen per device)."""

    kind: Literal["model"] = "model"
    model: ModelName
    version: Version


_POLICY_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # models.policy.FallbackPolicy.name


class PolicyChangeSpec(_Spec):
    """The change: enforce this version of this fallback policy (degraded mode).

    Without a version the rollout takes the latest one when it is created, and stores
    that number, so a version added later never changes a running rollout.
    """

    kind: Literal["policy"]
    policy: str = Field(pattern=_POLICY_NAME)
    version: int | None = Field(default=None, ge=1)


def _change_kind(value: object) -> str:
    """A model change unless it says otherwise: stored specs and older bodies have no kind."""
    if isinstance(value, dict):
        return str(value.get("kind", "model"))
    return str(getattr(value, "kind", "model"))


def _untagged(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Errors name ``change.version``, not ``change.model.version``: the kind is in the body."""
    try:
        return handler(value)
    except ValidationError as exc:
        tag = _change_kind(value)
        errors = [
            {**e, "loc": e["loc"][1:] if e["loc"][:1] == (tag,) else e["loc"]}
            for e in exc.errors(include_url=False)
        ]
        raise ValidationError.from_exception_data(exc.title, errors) from None  # type: ignore[arg-type]


ChangeSpec = Annotated[
    Annotated[ModelChangeSpec, Tag("model")] | Annotated[PolicyChangeSpec, Tag("policy")],
    Discriminator(_change_kind),
    WrapValidator(_untagged),
]


class RolloutSpec(_Spec):
    """Everything a rollout is asked to do; stored as given, so a restart reads the same."""

    name: str = Field(default="", max_length=128)
    change: ChangeSpec  # a model version (the default kind) or a fallback policy
    target: Target
    canary: Canary | None = None
    stages: Annotated[
        Annotated[Waves, Tag("waves")] | Annotated[ExponentialRate, Tag("exponential")],
        Discriminator(_stage_kind),
    ] = Field(default_factory=lambda: Waves(percents=[100]))
    soak_s: float = Field(default=600, ge=0, le=30 * 86_400)  # after a stage's last install
    check_interval_s: float = Field(default=60, gt=0, le=86_400)  # gate checks while soaking
    approval: bool = False  # each stage after the canary waits for an admin's approval
    max_concurrent: int | None = Field(default=None, ge=1)  # devices updating at once
    device_timeout_s: float = Field(default=3600, gt=0, le=30 * 86_400)
    maintenance_window: MaintenanceWindow | None = None
    gates: list[Gate] = Field(default_factory=list, max_length=16)
    abort_rules: list[AbortRule] = Field(default_factory=list, max_length=16)
