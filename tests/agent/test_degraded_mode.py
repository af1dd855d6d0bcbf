"""Degraded mode's state: parsing and keeping policies, the thermal hold, what is reported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.api.app import _watch_thermal
from agent.serving.degraded import DegradedMode, PolicyRejected, parse_policy
from agent.state.policy import PolicyKeeper
from models.device import GpuSample
from models.policy import BreakerSettings, Chain, FailureKind, FallbackPolicy, RulesTier
from models.wire import BreakerState, DesiredState, EventKind

CHAIN = Chain(tiers=(RulesTier(default="Try again later."),))


def policy(version: int = 1, **breaker: Any) -> FallbackPolicy:
    return FallbackPolicy(
        name="edge",
        version=version,
        breaker=BreakerSettings(**breaker),
        chains={"gemma3-270m": CHAIN},
    )


def desired(version: int, fallback: dict[str, Any]) -> DesiredState:
    return DesiredState(device_id="dev-1", version=version, fallback=fallback)


def test_parse_policy_names_the_first_bad_field() -> None:
    assert parse_policy({}) is None
    body = policy().model_dump(mode="json")
    body["breaker"]["minimum_calls"] = 50  # more than the window holds
    with pytest.raises(PolicyRejected, match="breaker"):
        parse_policy(body)
    body = policy().model_dump(mode="json")
    body["chains"]["gemma3-270m"]["tiers"][0]["kind"] = "teleport"
    with pytest.raises(PolicyRejected, match=r"chains\.gemma3-270m\.tiers\.0"):
        parse_policy(body)


class Events:
    def __init__(self) -> None:
        self.sent: list[tuple[EventKind, dict[str, Any]]] = []

    def __call__(self, kind: EventKind, message: str, severity: Any, data: dict[str, Any]) -> None:
        self.sent.append((kind, data))


def test_the_keeper_enforces_saves_refuses_and_falls_back_to_the_local_policy(
    tmp_path: Path,
) -> None:
    mode = DegradedMode()
    saved = tmp_path / "state" / "policy.json"
    local = policy(version=7)
    keeper = PolicyKeeper(mode, local, saved)
    events = Events()
    keeper.emit = events
    keeper.start(None)
    assert mode.ref() == local.ref()

    fleet = policy(version=2)
    keeper.apply(desired(1, fleet.model_dump(mode="json")))
    assert mode.ref() == fleet.ref()
    assert json.loads(saved.read_text())["version"] == 2
    assert events.sent == [(EventKind.POLICY_APPLIED, fleet.ref().model_dump(mode="json"))]

    keeper.apply(desired(2, {"name": "edge", "version": 3, "chains": "not a mapping"}))
    assert mode.ref() == fleet.ref()  # the last good one stays
    assert events.sent[-1][0] is EventKind.POLICY_REJECTED
    assert "chains" in events.sent[-1][1]["reason"]

    keeper.apply(desired(3, {}))  # unassigned: back to the configuration's
    assert mode.ref() == local.ref()
    assert not saved.exists()


def test_a_restart_enforces_the_saved_policy_or_the_saved_states_own(tmp_path: Path) -> None:
    saved = tmp_path / "policy.json"
    fleet = policy(version=2)
    saved.write_text(fleet.model_dump_json())
    malformed_later = desired(5, {"name": "edge", "version": 3, "chains": 1})
    mode = DegradedMode()
    PolicyKeeper(mode, None, saved).start(malformed_later)
    assert mode.ref() == fleet.ref()  # the last good one, not the malformed last state

    saved.unlink()
    mode = DegradedMode()
    PolicyKeeper(mode, None, saved).start(desired(5, fleet.model_dump(mode="json")))
    assert mode.ref() == fleet.ref()  # policy.json lost: the verified saved state's


class HotGpu:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def sample(self) -> list[GpuSample]:
        return [GpuSample(index=0, temperature_c=self.temperature)]


def test_a_hot_gpu_holds_the_breakers_open_until_it_cools() -> None:
    mode = DegradedMode()
    mode.set_policy(policy(max_temperature_c=80, wait_in_open=0.01), "test")
    moves: list[BreakerState] = []
    mode.listeners.append(lambda t: moves.append(t.new))
    gpu = HotGpu(91.0)

    async def until(state: BreakerState) -> None:
        while mode.breaker("gemma3-270m").state is not state:
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        task = asyncio.create_task(_watch_thermal(mode, gpu, 0.01))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(until(BreakerState.OPEN), 10)
            view = mode.breaker("gemma3-270m").view()
            assert view.kind is FailureKind.THERMAL
            assert "91.0" in view.reason
            assert [d.kind for d in mode.degraded()] == [FailureKind.THERMAL]
            assert mode.breaker("gemma3-270m").acquire() is None  # held: no probes
            gpu.temperature = 60.0
            await asyncio.wait_for(until(BreakerState.HALF_OPEN), 20)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert moves[0] is BreakerState.OPEN
