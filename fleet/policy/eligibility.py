"""Which devices can take a policy, and why not: pure, the device's models in, reasons out.

A device can take a policy when, for every served model it has, it also has every
model that model's chain names (the smaller model, the CPU copy, the cache's
embedder). A chain for a model the device does not serve at all is no reason to
refuse: it simply never applies there, so one policy can cover a mixed fleet.
"""

from __future__ import annotations

from collections.abc import Collection

from fleet.tables import Device
from models.policy import FallbackPolicy

__all__ = ["device_models", "ineligible_reasons"]


def device_models(device: Device) -> set[str]:
    """The models a device has: those in its stored desired state, and those it reports.

    A reported model whose state is ``missing`` (desired, but not in its store) does
    not count; loading, ready and failed ones do.
    """
    names: set[str] = set()
    desired_models = (device.desired or {}).get("models") or []
    reported_models = (device.reported or {}).get("models") or []
    for model in desired_models:
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            names.add(model["name"])
    for model in reported_models:
        if (
            isinstance(model, dict)
            and isinstance(model.get("name"), str)
            and model.get("state") != "missing"
        ):
            names.add(model["name"])
    return names


def ineligible_reasons(policy: FallbackPolicy, has: Collection[str]) -> list[str]:
    """One reason per model a chain needs and the device lacks; empty: the device can take it.

    Only chains for models in ``has`` count: a chain for a served model the device does
    not serve at all is not a reason, it just never applies on that device.
    """
    reasons = []
    for served, chain in policy.chains.items():
        if served not in has:
            continue
        for needed in chain.models():
            if needed not in has:
                reasons.append(
                    f"chain for {served} names {needed}, which this device does not have"
                )
    return reasons
