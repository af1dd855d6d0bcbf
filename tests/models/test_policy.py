"""The fallback-policy contract: what validates, what is refused, and the digest."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

import models.policy
from models.policy import (
    BreakerSettings,
    CacheTier,
    Chain,
    FallbackPolicy,
    ModelTier,
    RulesTier,
    policy_digest,
)

CHAINS: dict[str, Any] = {
    "gemma3-270m": {
        "breaker": {"wait_in_open": 5},
        "tiers": [
            {"kind": "model", "model": "gemma3-270m-q2", "when": ["out_of_memory"]},
            {"kind": "model", "model": "gemma3-270m", "device": "cpu"},
            {"kind": "cache", "embedder": "minilm"},
            {"kind": "rules", "default": "Later, please."},
        ],
    }
}


def test_public_api() -> None:
    assert "FallbackPolicy" in models.policy.__all__
    assert all(hasattr(models.policy, name) for name in models.policy.__all__)


def test_a_full_policy_parses_and_names_its_models() -> None:
    policy = FallbackPolicy.model_validate({"name": "lab", "version": 3, "chains": CHAINS})
    kinds = [type(t) for t in policy.chains["gemma3-270m"].tiers]
    assert kinds == [ModelTier, ModelTier, CacheTier, RulesTier]
    assert policy.models() == ["gemma3-270m", "gemma3-270m-q2", "minilm"]
    assert policy.breaker_for("gemma3-270m").wait_in_open == 5  # the chain's own
    assert policy.breaker_for("other") == BreakerSettings()  # the policy's


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"breaker": {"minimum_calls": 30, "sliding_window": 20}}, "minimum_calls"),
        ({"breaker": {"failure_rate_threshold": 0}}, "failure_rate_threshold"),
        ({"breaker": {"wait_in_open": float("inf")}}, "wait_in_open"),
        ({"breaker": {"surprise": 1}}, "surprise"),
        ({"name": "Not A Name"}, "name"),
        ({"version": 0}, "version"),
        ({"chains": {"m": {"tiers": [{"kind": "teleport"}]}}}, "teleport"),
        ({"chains": {"m": {"tiers": [{"kind": "model", "model": "m"}]}}}, "fall back to itself"),
        ({"chains": {"m": {"tiers": [{"kind": "rules"}]}}}, "rules or a default"),
        (
            {"chains": {"m": {"tiers": [{"kind": "cache", "embedder": "e", "threshold": 1.5}]}}},
            "threshold",
        ),
        ({"chains": {"m": {"tiers": [{"kind": "rules", "default": "x"}] * 9}}}, "tiers"),
    ],
)
def test_what_cannot_work_is_refused_naming_it(change: dict[str, Any], where: str) -> None:
    body = {"name": "lab", "version": 1, "chains": {}} | change
    with pytest.raises(ValidationError, match=where):
        FallbackPolicy.model_validate(body)


def test_a_cpu_copy_of_the_model_itself_is_allowed() -> None:
    chain = Chain(tiers=(ModelTier(model="m", device="cpu"),))
    assert FallbackPolicy(name="p", version=1, chains={"m": chain}).models() == ["m"]


def test_the_digest_is_of_the_content_whatever_the_key_order() -> None:
    policy = FallbackPolicy.model_validate({"name": "lab", "version": 1, "chains": CHAINS})
    body = policy.model_dump(mode="json")
    reordered = dict(reversed(list(body.items())))
    assert policy_digest(reordered) == policy_digest(policy) == policy.ref().digest
    other = policy.model_copy(update={"version": 2})
    assert policy_digest(other) != policy_digest(policy)
