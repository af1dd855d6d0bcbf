"""Staged rollouts end to end: a real controller, a real Mosquitto, simulated devices.

The devices are the simulator's (``fleet.simulate``): they enroll, update the way an
agent does (events, then the new version reported), send telemetry every 0.2 s, and can
be made slower on a version or dropped off the broker. The rollout engine runs in the
controller process, stepping every 0.2 s. What is checked is what an admin would see
through the API and the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fleet.simulate import (
    HardwareMix,
    ModelRef,
    RegressionRules,
    ServedModel,
    Simulation,
    SimulationConfig,
)
from scripts import servers
from scripts.servers import MosquittoBroker, running_controller
from tests.polling import eventually

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "rollout-admin-token-0123456789abcdef"
LLM = "gemma3-270m"
DEADLINE_S = 45.0
V1 = b"GGUF" + bytes(range(256)) * 40
V2 = b"GGUF" + bytes(range(255, -1, -1)) * 40
SHA1, SHA2 = hashlib.sha256(V1).hexdigest(), hashlib.sha256(V2).hexdigest()
STARTS_ON = ServedModel.initial(ModelRef.parse(f"{LLM}@0.9"))  # not in the registry


@pytest.fixture
def controller(tmp_path: Path, broker: MosquittoBroker) -> Iterator[servers.Controller]:
    with running_controller(
        tmp_path,
        f"sqlite:///{tmp_path / 'fleet.db'}",
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
        env={
            "EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S": "0.2",
        },
        ready_s=60,
    ) as running:  # fmt: skip
        yield running


def api(controller: servers.Controller) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=controller.url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Edgefleet-Actor": "tester"},
        timeout=15,
    )


async def until(check: Callable[[], Any], what: str, within_s: float = DEADLINE_S) -> Any:
    return await eventually(check, what, within_s=within_s, every_s=0.1)


async def ok(response: httpx.Response) -> Any:
    assert response.is_success, response.text
    return response.json()


async def fleet_on_v1(client: httpx.AsyncClient, config: SimulationConfig) -> None:
    """Register 1.0 and 2.0, and put every device of group "lab" on 1.0."""
    for version, data in (("1.0", V1), ("2.0", V2)):
        await ok(
            await client.post(
                f"/api/v1/models/{LLM}/versions/{version}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
        )
    await ok(
        await client.put(
            "/api/v1/groups/lab/desired", json={"models": [{"name": LLM, "version": "1.0"}]}
        )
    )


async def serving(client: httpx.AsyncClient, device_id: str) -> str | None:
    """The sha256 of the model the device reports serving."""
    reported = (await client.get(f"/api/v1/devices/{device_id}")).json()["reported"] or {}
    models = [m for m in reported.get("models", []) if m["name"] == LLM and m["state"] == "ready"]
    return str(models[0]["sha256"]) if models else None


async def all_serve(client: httpx.AsyncClient, ids: list[str], sha: str) -> bool:
    return all([await serving(client, d) == sha for d in ids])


async def token(client: httpx.AsyncClient, uses: int) -> str:
    created = await ok(await client.post("/api/v1/tokens", json={"uses": uses, "group": "lab"}))
    return str(created["secret"])


def simulation(controller: servers.Controller, secret: str, devices: int, **kw: Any) -> Simulation:
    return Simulation(
        SimulationConfig(
            devices=devices,
            fleet_url=controller.url,
            token=secret,
            interval_s=0.2,
            models=(STARTS_ON,),
            update_s=0.1,
            **kw,
        )
    )


def busy_samples(controller: servers.Controller, ids: list[str], count: int) -> bool:
    """Whether the devices sent ``count`` samples with requests in them, all together.

    Simulated devices, like real ones, differ in traffic: some are busy in most
    samples, some in few, so a baseline is counted over the fleet.
    """
    engine = sa.create_engine(f"sqlite:///{controller.data_dir.parent / 'fleet.db'}")
    try:
        with engine.connect() as conn:
            rows = dict(
                conn.execute(
                    sa.text(
                        "SELECT device_id, count(*) FROM telemetry WHERE requests > 0 "
                        "GROUP BY device_id"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    return sum(rows.get(d, 0) for d in ids) >= count


async def rollout(client: httpx.AsyncClient, rollout_id: str) -> dict[str, Any]:
    return dict(await ok(await client.get(f"/api/v1/rollouts/{rollout_id}")))


async def members(client: httpx.AsyncClient, rollout_id: str) -> dict[str, dict[str, Any]]:
    rows = await ok(await client.get(f"/api/v1/rollouts/{rollout_id}/devices"))
    return {row["device_id"]: row for row in rows}


def test_a_canary_slower_on_the_new_version_fails_its_gate_and_is_rolled_back(
    controller: servers.Controller,
) -> None:
    async def scenario() -> str:
        async with api(controller) as client:
            await ok(await client.post("/api/v1/groups", json={"name": "lab"}))
            secret = await token(client, 6)
            slower = RegressionRules.parse([f"{LLM}@2.0:latency=3"])
            same = HardwareMix.of("x86-cpu-8g")  # the control group is comparable hardware
            async with simulation(controller, secret, 6, regressions=slower, hardware=same) as sim:
                ids = [d.identity.device_id for d in sim.devices]
                await fleet_on_v1(client, sim.config)
                await until(lambda: all_serve(client, ids, SHA1), "every device on 1.0")
                await until(lambda: busy_samples(controller, ids, 60), "a baseline of busy samples")
                spec = {
                    "change": {"model": LLM, "version": "2.0"},
                    "target": {"groups": ["lab"]},
                    "canary": {"count": 3},
                    "stages": {"percents": [100]},
                    "soak_s": 30,
                    "check_interval_s": 1,
                    "gates": [
                        {
                            "metric": "p95_latency_ms",
                            "window_s": 10,
                            "min_samples": 3,
                            "max_increase_percent": 20,
                            "max_consecutive_failures": 2,
                        }
                    ],
                }
                created = await ok(await client.post("/api/v1/rollouts", json=spec))
                rollout_id = created["id"]

                async def aborted() -> dict[str, Any] | None:
                    detail = await rollout(client, rollout_id)
                    return detail if detail["status"] == "aborted" else None

                detail = await until(aborted, "the rollout aborted on its gate")
                assert "p95_latency_ms" in detail["reason"]
                devices = await members(client, rollout_id)
                canaries = [d for d, m in devices.items() if m["stage"] == 0]
                assert len(canaries) == 3
                assert {devices[d]["state"] for d in canaries} == {"rolled_back"}
                others = [d for d in ids if d not in canaries]
                assert {devices[d]["state"] for d in others} == {"pending"}
                # The canaries serve 1.0 again; the others never left it.
                await until(lambda: all_serve(client, canaries, SHA1), "canaries back on 1.0")
                assert await all_serve(client, others, SHA1)
                # The failing checks are stored with their evidence.
                failed = [c for c in detail["gate_checks"] if c["verdict"] == "fail"]
                assert failed, detail["gate_checks"]
                evidence = failed[0]["evidence"]
                assert max(evidence["change_percent"].values()) > 20  # 3x slower: +200%
                assert evidence["updated"]["samples"] >= 3
                actions = [(e["actor"], e["action"]) for e in detail["audit"]]
                assert ("controller", "rollout.aborted") in actions
                assert ("admin:tester", "rollout.created") in actions
                return str(rollout_id)

    rollout_id = asyncio.run(scenario())
    listed = controller.cli("rollouts", "list", "--admin-token", ADMIN_TOKEN)
    assert rollout_id in listed
    assert "aborted" in listed
    shown = controller.cli("rollouts", "status", rollout_id, "--admin-token", ADMIN_TOKEN)
    assert "p95_latency_ms: fail" in shown
    assert "rollout.aborted" in shown


def test_a_good_rollout_completes_with_an_offline_device_and_one_that_joins(
    controller: servers.Controller,
) -> None:
    """Approval between stages; an offline device times out without blocking, then updates."""

    async def scenario() -> None:
        async with api(controller) as client:
            await ok(await client.post("/api/v1/groups", json={"name": "lab"}))
            secret = await token(client, 6)
            # 2.0 is good: no simulated errors, so no device's own error rate can fail the
            # gate by chance (one error in a quiet device's few requests is above 5%).
            clean = RegressionRules.parse([f"{LLM}@2.0:errors=0"])
            async with simulation(controller, secret, 6, regressions=clean) as sim:
                ids = [d.identity.device_id for d in sim.devices]
                await fleet_on_v1(client, sim.config)
                await until(lambda: all_serve(client, ids, SHA1), "every device on 1.0")
                spec = {
                    "change": {"model": LLM, "version": "2.0"},
                    "target": {"groups": ["lab"]},
                    "canary": {"count": 1},
                    "stages": {"percents": [50, 100]},
                    "soak_s": 1,
                    "check_interval_s": 0.5,
                    "approval": True,
                    "device_timeout_s": 4,
                    "gates": [
                        {
                            "metric": "error_rate",
                            "window_s": 30,  # a quiet canary has few busy samples
                            "min_samples": 1,
                            "max_value": 0.05,
                        }
                    ],
                }
                rollout_id = (await ok(await client.post("/api/v1/rollouts", json=spec)))["id"]
                # Release order is the rank order: the second device goes in the 50% stage.
                order = list((await members(client, rollout_id)).keys())
                late = order[1]
                await sim.take_offline(late)

                async def awaiting(stage: int) -> bool:
                    detail = await rollout(client, rollout_id)
                    return bool(detail["stage"] == stage and detail["phase"] == "awaiting_approval")

                await until(lambda: awaiting(0), "the canary stage passed, awaiting approval")
                await ok(await client.post(f"/api/v1/rollouts/{rollout_id}/approve", json={}))
                # A device that joins the group now is released into the current stage.
                async with simulation(
                    controller, await token(client, 1), 1, regressions=clean
                ) as joiner:
                    new_id = joiner.devices[0].identity.device_id
                    await until(lambda: awaiting(1), "the 50% stage passed without the offline one")
                    devices = await members(client, rollout_id)
                    assert devices[late]["state"] == "timed_out"
                    assert (devices[new_id]["stage"], devices[new_id]["state"]) == (1, "updated")
                    # Back online, it finds its retained desired state and updates.
                    await sim.bring_online(late)

                    async def late_updated() -> bool:
                        return bool((await members(client, rollout_id))[late]["state"] == "updated")

                    await until(late_updated, "the returned device counted as updated")
                    await ok(await client.post(f"/api/v1/rollouts/{rollout_id}/approve", json={}))

                    async def completed() -> dict[str, Any] | None:
                        detail = await rollout(client, rollout_id)
                        return detail if detail["status"] == "completed" else None

                    detail = await until(completed, "the rollout completed")
                    assert await all_serve(client, [*ids, new_id], SHA2)
                assert detail["devices"] == {"updated": 7}, detail["audit"][:5]
                stages = [
                    e["data"]["stage"]
                    for e in reversed(detail["audit"])
                    if e["action"] == "rollout.stage_started"
                ]
                assert stages == [1, 2]
                timed_out = [
                    e for e in detail["audit"]
                    if e["action"] == "rollout.device_failed" and e["data"]["device"] == late
                ]  # fmt: skip
                assert timed_out
                assert timed_out[0]["data"]["failure"] == "timed_out"

    asyncio.run(scenario())
