"""Pure decisions of degraded mode: what a failure is, and which tiers may answer next.

The walker (:mod:`agent.serving.fallback`) asks these and does the I/O. A failure
is classified once, here, from the agent's error tree; an error that is the
request's fault (a 4xx) is no failure of the model and never falls back.
"""

from __future__ import annotations

from agent.errors import (
    AgentError,
    MemoryBudgetExceeded,
    ModelFailed,
    ModelNotReady,
    Overloaded,
    RequestRejected,
)
from agent.serving.registry import COPY_MARK
from models.policy import CacheTier, Chain, FailureKind, ModelTier, RulesTier, Tier

__all__ = ["CPU_SUFFIX", "failure_kind", "load_failure", "served_name", "tier_label", "tiers_for"]

CPU_SUFFIX = COPY_MARK + "cpu"  # the registry name of a model's CPU copy: "gemma3-270m@cpu"


def failure_kind(exc: AgentError) -> FailureKind | None:
    """What ``exc`` says about the model; None when it is not the model's failure.

    A model still loading is not a failure either (None): the request moves on to the
    next tier, but the breaker does not count it.
    """
    if isinstance(exc, RequestRejected):
        return None
    if isinstance(exc, ModelFailed):
        return exc.failure
    if isinstance(exc, ModelNotReady):
        return exc.failure
    if isinstance(exc, Overloaded):
        return FailureKind.OVERLOADED
    return FailureKind.ERROR  # the runtime raised, or the request timed out


def load_failure(exc: AgentError) -> FailureKind:
    """Why a model did not load: out of memory (the budget), else a load failure."""
    return (
        FailureKind.OUT_OF_MEMORY
        if isinstance(exc, MemoryBudgetExceeded)
        else FailureKind.LOAD_FAILED
    )


def tiers_for(chain: Chain, kind: FailureKind | None) -> list[Tier]:
    """The chain's tiers that apply to a failure of ``kind``, in order.

    A tier without ``when`` applies to any failure; ``kind`` None (the primary was
    skipped without a known cause) matches only those.
    """
    return [
        tier for tier in chain.tiers if not tier.when or (kind is not None and kind in tier.when)
    ]


def served_name(tier: ModelTier) -> str:
    """The registry name a model tier is served under."""
    return tier.model + CPU_SUFFIX if tier.device == "cpu" else tier.model


def tier_label(tier: Tier) -> str:
    """How metrics, telemetry and response marks name a tier: model, cpu, cache or rules."""
    if isinstance(tier, ModelTier):
        return "cpu" if tier.device == "cpu" else "model"
    if isinstance(tier, CacheTier):
        return "cache"
    assert isinstance(tier, RulesTier)
    return "rules"
