"""Policy eligibility is pure: a device's models in, one reason per missing model out."""

from __future__ import annotations

from typing import Any

from fleet.policy.eligibility import device_models, ineligible_reasons
from fleet.tables import Device
from models.policy import FallbackPolicy

POLICY = FallbackPolicy.model_validate(
    {
        "name": "edge",
        "version": 1,
        "chains": {
            "gemma3-270m": {
                "tiers": [
                    {"kind": "model", "model": "gemma3-270m-q2"},
                    {"kind": "model", "model": "gemma3-270m", "device": "cpu"},
                    {"kind": "cache", "embedder": "minilm"},
                    {"kind": "rules", "default": "offline"},
                ]
            },
            "phi-mini": {"tiers": [{"kind": "model", "model": "phi-tiny"}]},
        },
    }
)


def device(desired: list[str], reported: list[tuple[str, str]]) -> Device:
    state: dict[str, Any] = {"models": [{"name": n, "state": s} for n, s in reported]}
    return Device(
        id="d1",
        name="d1",
        public_key="k",
        mqtt_password_hash="h",
        desired={"models": [{"name": n} for n in desired]},
        reported=state,
    )


def test_device_models_are_desired_and_reported_but_not_missing() -> None:
    d = device(["gemma3-270m"], [("minilm", "ready"), ("old", "failed"), ("gone", "missing")])
    assert device_models(d) == {"gemma3-270m", "minilm", "old"}
    bare = Device(id="d2", name="d2", public_key="k2", mqtt_password_hash="h")
    assert device_models(bare) == set()


def test_every_missing_model_is_one_reason_naming_it() -> None:
    reasons = ineligible_reasons(POLICY, {"gemma3-270m"})
    assert reasons == [
        "chain for gemma3-270m names gemma3-270m-q2, which this device does not have",
        "chain for gemma3-270m names minilm, which this device does not have",
    ]
    assert ineligible_reasons(POLICY, {"gemma3-270m", "gemma3-270m-q2", "minilm"}) == []


def test_a_chain_for_a_model_the_device_does_not_serve_never_applies() -> None:
    assert ineligible_reasons(POLICY, {"minilm"}) == []
    assert ineligible_reasons(POLICY, set()) == []
