"""The controller's rules, restated below :mod:`fleet.simulate`.

The layering allows the seeder only what lies below :mod:`fleet.simulate`, so the
rollout plan's device rank and stage quotas, a spec's defaults and the registry's
target paths are restated here; ``tests/fleet/test_seed.py`` checks that they agree
with the originals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any


def target_path(name: str, version: str, variant: str, fmt: str) -> str:
    """The artifact's TUF target path (``fleet.registry.targets.target_path``)."""
    return f"{name}/{version}/{variant}.{fmt}"


def device_rank(rollout_id: str, device_id: str) -> str:
    """A device's release order in a rollout (``fleet.rollout.plan.device_rank``)."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()[:16]


def stage_quotas(canary: int | None, percents: Sequence[float], eligible: int) -> list[int]:
    """Devices released once each stage is done (``fleet.rollout.plan.stage_quotas``).

    ``canary`` is a count (a percent canary is one more entry of ``percents``).
    """

    def share(percent: float) -> int:
        return min(eligible, max(1, math.ceil(round(eligible * percent / 100, 9))))

    quotas = [min(canary, eligible)] if canary is not None else []
    quotas += [share(p) for p in percents]
    running = 0
    for i, quota in enumerate(quotas):
        running = max(running, quota)
        quotas[i] = running
    return quotas


def rollout_spec(
    name: str,
    model: str,
    version: str,
    target: dict[str, list[str]],
    canary: dict[str, float | int | None],
    percents: list[float],
    gates: list[dict[str, Any]],
    abort_rules: list[dict[str, Any]],
    **rest: Any,
) -> dict[str, Any]:
    """A model rollout's spec as the engine stores it: ``RolloutSpec.model_dump(mode="json")``."""
    gate_defaults: dict[str, Any] = {
        "window_s": 300.0, "min_samples": 3, "max_increase_percent": None,
        "max_decrease_percent": None, "max_value": None, "min_value": None,
        "on_insufficient_data": "wait", "max_consecutive_failures": 3,
    }  # fmt: skip
    rule_defaults: dict[str, Any] = {
        "failure": "any", "threshold_percent": None, "threshold_count": None, "min_devices": 1,
    }  # fmt: skip
    facts: dict[str, Any] = {"arch": [], "min_ram_bytes": None, "max_ram_bytes": None, "gpu": None}
    spec: dict[str, Any] = {
        "name": name,
        "change": {"kind": "model", "model": model, "version": version},
        "target": {"groups": [], "tags": [], "devices": [], **target,
                   "facts": {**facts, "agent_version": None}},
        "canary": {"count": None, "percent": None, **canary},
        "stages": {"kind": "waves", "percents": [float(p) for p in percents]},
        "soak_s": 600.0,
        "check_interval_s": 60.0,
        "approval": False,
        "max_concurrent": None,
        "device_timeout_s": 3600.0,
        "maintenance_window": None,
        "gates": [{**gate_defaults, **gate} for gate in gates],
        "abort_rules": [{**rule_defaults, **rule} for rule in abort_rules],
    }  # fmt: skip
    for key, value in rest.items():
        spec[key] = float(value) if key.endswith("_s") else value
    for gate in spec["gates"]:
        for key in ("window_s", "max_increase_percent", "max_value"):
            if gate[key] is not None:
                gate[key] = float(gate[key])
    for rule in spec["abort_rules"]:
        if rule["threshold_percent"] is not None:
            rule["threshold_percent"] = float(rule["threshold_percent"])
    if spec["canary"]["percent"] is not None:
        spec["canary"]["percent"] = float(spec["canary"]["percent"])
    return spec
