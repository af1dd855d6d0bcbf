"""A real `edgefleet-agent serve` joins a fleet: enrolls, obeys its desired state, reports.

The controller side is faked with fleet-independent code (a tiny enrollment endpoint
and a plain MQTT client), the broker is a real Mosquitto, and the model is the real
bundled MiniLM.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.wire import Command, CommandKind, DesiredModel, DesiredState, encode
from scripts.servers import MosquittoBroker
from tests.agent.link_support import Watcher, authorize, controller_client, shared_director
from tests.conftest import start_agent
from tests.fakes.enrollment import FakeController, accept_as
from tests.polling import wait_until

pytestmark = pytest.mark.integration

EVERY_S = 0.1  # seconds between probes: each asks the agent process over HTTP
DEVICE = "dev-integration-1"
PASSWORD = "integration-secret"


def fleet_status(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/v1/fleet", timeout=5).json()
    return body


def test_an_agent_joins_the_fleet_and_serves_its_desired_models_offline(
    broker: MosquittoBroker, tmp_path: Path, model_store: Path
) -> None:
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    loop = asyncio.new_event_loop()
    watcher = Watcher(broker, client_id="integration-watcher", persistent=True)
    loop.run_until_complete(watcher.start())

    def seen(channel: str) -> list[dict[str, Any]]:
        loop.run_until_complete(asyncio.sleep(0.05))  # let the watcher read
        return [m.json() for m in watcher.on(channel)]

    async def publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        async with controller_client(broker, "integration-publisher") as client:
            await client.publish(topic, payload, qos=1, retain=retain)

    try:
        with FakeController(
            accept_as(DEVICE, broker.url, PASSWORD, telemetry_interval_s=3600)
        ) as ctl:
            fleet = {
                "url": ctl.url,
                "token": "first-boot-token",
                "state_dir": state_dir,
                "trust_root": shared_director().root_file,
            }
            agent = start_agent(tmp_path, model_store, settings={"fleet": fleet}, models=[])
            try:
                assert len(ctl.requests) == 1  # enrolled before serving
                identity = json.loads((state_dir / "identity.json").read_text())
                assert identity["device_id"] == DEVICE
                wait_until(
                    lambda: fleet_status(agent.url)["connected"], "connected", every_s=EVERY_S
                )
                desired = DesiredState(
                    device_id=DEVICE, version=1, models=[DesiredModel(name="minilm")]
                )
                loop.run_until_complete(
                    publish(
                        f"edgefleet/v1/devices/{DEVICE}/desired",
                        shared_director().sign(desired),
                        retain=True,
                    )
                )
                wait_until(
                    lambda: httpx.get(f"{agent.url}/readyz").json()["models"] == ["minilm"],
                    "minilm served",
                    every_s=EVERY_S,
                )
                embedded = httpx.post(
                    f"{agent.url}/v1/embeddings",
                    json={"model": "minilm", "input": "hi"},
                    timeout=30,
                )
                assert embedded.status_code == 200
                flush = Command(device_id=DEVICE, id="flush-integration", kind=CommandKind.FLUSH)
                loop.run_until_complete(
                    publish(f"edgefleet/v1/devices/{DEVICE}/cmd", encode(flush))
                )
                batch = wait_until(lambda: seen("telemetry"), "telemetry", every_s=EVERY_S)[0]
                assert batch["samples"][0]["requests"] >= 1
                report = wait_until(
                    lambda: [
                        r
                        for r in seen("reported")
                        if r.get("converged") and r.get("desired_version") == 1
                    ],
                    "a converged report",
                    every_s=EVERY_S,
                )[-1]
                assert [(m["name"], m["state"]) for m in report["models"]] == [("minilm", "ready")]
            finally:
                agent.stop()
        kinds = [e["kind"] for e in seen("events")]
        assert kinds[0] == "online"
        assert "model_ready" in kinds
        assert kinds[-1] == "offline"  # said goodbye on SIGTERM
    finally:
        loop.run_until_complete(watcher.stop())
        loop.close()

    # No controller, no broker: the device still serves what the fleet last asked for.
    broker.stop()
    again = start_agent(
        tmp_path,
        model_store,
        settings={"fleet": {"url": ctl.url, "state_dir": state_dir}},
        models=[{"name": "gemma3-270m"}],  # the config's list loses to the saved desired state
    )
    try:
        assert httpx.get(f"{again.url}/readyz").json()["models"] == ["minilm"]
        status = fleet_status(again.url)
        assert (status["enrolled"], status["connected"]) == (True, False)
        assert status["applied_desired_version"] == 1
    finally:
        again.stop()
