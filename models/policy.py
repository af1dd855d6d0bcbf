"""Degraded-mode fallback policies: what a device does when a served model cannot answer.

The controller authors a policy, checks it against each device's models and sends it
inside the device's signed desired state (``DesiredState.fallback``); the agent
enforces it on its own, online or not. Both sides validate with these models, so the
controller can never sign a policy that a device would refuse.

A policy holds a breaker setting (resilience4j's vocabulary, so operators recognise
it) and, for each served model name, a chain of fallback tiers tried in order when
the one before is open or fails. After the last tier the agent answers 503 with
Retry-After. A tier may be limited to some kinds of failure (``when``): out of memory
goes to a smaller model, a GPU fault to a CPU copy.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.values import ModelName

__all__ = [
    "MAX_RULES",
    "MAX_TIERS",
    "BreakerSettings",
    "CacheTier",
    "Chain",
    "FailureKind",
    "FallbackPolicy",
    "ModelTier",
    "PolicyRef",
    "Rule",
    "RulesTier",
    "Tier",
    "policy_digest",
]

MAX_TIERS = 8
MAX_RULES = 200


class FailureKind(StrEnum):
    """Why a model could not answer; a tier's ``when`` picks among these."""

    ERROR = "error"  # the runtime raised, or the request timed out
    SLOW = "slow"  # too many calls slower than slow_call_duration
    OUT_OF_MEMORY = "out_of_memory"  # allocation failed, or the memory budget is exhausted
    LOAD_FAILED = "load_failed"  # the model file is missing, corrupt or does not load
    OVERLOADED = "overloaded"  # its queue is full
    THERMAL = "thermal"  # the device is too hot, throttled or power-limited
    GPU_FAULT = "gpu_fault"  # the GPU runtime failed (CUDA errors, lost device)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BreakerSettings(_Strict):
    """When a model's breaker opens and how it comes back (resilience4j's names).

    The window counts the last ``sliding_window`` calls; the breaker opens when at
    least ``minimum_calls`` are in it and the failure or slow-call rate reaches its
    threshold. After ``wait_in_open`` it lets ``permitted_calls_in_half_open`` probe
    calls through: all succeed and it closes, any fails and it opens again.
    """

    failure_rate_threshold: float = Field(default=50.0, gt=0, le=100)  # percent
    slow_call_duration: float = Field(default=10.0, gt=0, le=3600)  # seconds to first token
    slow_call_rate_threshold: float = Field(default=100.0, gt=0, le=100)  # percent
    minimum_calls: int = Field(default=5, ge=1, le=10_000)
    sliding_window: int = Field(default=20, ge=1, le=10_000)  # calls
    wait_in_open: float = Field(default=30.0, gt=0, le=86_400)  # seconds
    permitted_calls_in_half_open: int = Field(default=2, ge=1, le=1000)
    max_temperature_c: float | None = Field(default=None, gt=0, le=150)  # None: no thermal trip
    open_on_throttle: bool = False  # open while the probe reports thermal or power throttling

    @model_validator(mode="after")
    def _window_holds_minimum(self) -> BreakerSettings:
        if self.minimum_calls > self.sliding_window:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) cannot exceed "
                f"sliding_window ({self.sliding_window})"
            )
        return self


class _TierBase(_Strict):
    when: tuple[FailureKind, ...] = ()  # empty: any failure


class ModelTier(_TierBase):
    """Another model the device serves: smaller, lower-bit, or (``device="cpu"``) a CPU copy.

    It is one of the device's served models, so it is loaded and warm: the first
    fallback answer comes at once. A CPU tier makes the agent keep a CPU copy of a
    GPU-served model beside it (none when the model already runs on the CPU).
    """

    kind: Literal["model"] = "model"
    model: ModelName
    device: Literal["cpu"] | None = None  # "cpu": its copy with no GPU layers


class CacheTier(_TierBase):
    """Past good answers, found by meaning with an on-device embedding model."""

    kind: Literal["cache"] = "cache"
    embedder: ModelName  # an ONNX embedding model the device serves (MiniLM)
    threshold: float = Field(default=0.9, gt=0, le=1)  # cosine similarity to accept a hit
    max_entries: int = Field(default=1000, ge=1, le=100_000)


class Rule(_Strict):
    """Answer ``answer`` when the prompt contains any of ``keywords`` (case-insensitive)."""

    keywords: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        min_length=1, max_length=50
    )
    answer: str = Field(min_length=1, max_length=4000)


class RulesTier(_TierBase):
    """Fixed answers: keyword rules first, then ``default`` (None: fall through)."""

    kind: Literal["rules"] = "rules"
    rules: tuple[Rule, ...] = Field(default=(), max_length=MAX_RULES)
    default: str | None = Field(default=None, min_length=1, max_length=4000)

    @model_validator(mode="after")
    def _answers_something(self) -> RulesTier:
        if not self.rules and self.default is None:
            raise ValueError("a rules tier needs rules or a default answer")
        return self


Tier = Annotated[ModelTier | CacheTier | RulesTier, Field(discriminator="kind")]


class Chain(_Strict):
    """The fallbacks of one served model, after the model itself; a 503 follows the last."""

    tiers: tuple[Tier, ...] = Field(default=(), max_length=MAX_TIERS)
    breaker: BreakerSettings | None = None  # None: the policy's
    retry_after: int = Field(default=30, ge=1, le=3600)  # seconds, on the final 503

    def models(self) -> list[str]:
        """Every model the chain needs on the device, in order."""
        names: list[str] = []
        for tier in self.tiers:
            name = tier.model if isinstance(tier, ModelTier) else getattr(tier, "embedder", None)
            if name is not None and name not in names:
                names.append(name)
        return names


class FallbackPolicy(_Strict):
    """A named, versioned degraded-mode policy, as sent in ``DesiredState.fallback``."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    version: int = Field(ge=1)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    chains: dict[ModelName, Chain] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _no_self_fallback(self) -> FallbackPolicy:
        for served, chain in self.chains.items():
            for tier in chain.tiers:
                if isinstance(tier, ModelTier) and tier.model == served and tier.device is None:
                    raise ValueError(
                        f"chains.{served}: a model cannot fall back to itself "
                        '(use device = "cpu" for a CPU copy)'
                    )
        return self

    def breaker_for(self, model: str) -> BreakerSettings:
        chain = self.chains.get(model)
        return chain.breaker if chain is not None and chain.breaker is not None else self.breaker

    def models(self) -> list[str]:
        """Every model the policy names: served models and the models of their tiers."""
        names: list[str] = []
        for served, chain in self.chains.items():
            for name in (served, *chain.models()):
                if name not in names:
                    names.append(name)
        return names

    def ref(self) -> PolicyRef:
        return PolicyRef(name=self.name, version=self.version, digest=policy_digest(self))


class PolicyRef(BaseModel):
    """Which policy a device enforces, as it reports it; the digest pins the content."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(max_length=64)
    version: int = Field(ge=1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


def policy_digest(policy: FallbackPolicy | dict[str, Any]) -> str:
    """sha256 of the policy's canonical JSON: the same content has the same digest anywhere."""
    data = policy.model_dump(mode="json") if isinstance(policy, FallbackPolicy) else policy
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
