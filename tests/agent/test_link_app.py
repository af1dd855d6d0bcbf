"""The link inside the app: desired state drives the real executor, telemetry sees requests.

In-process (FastAPI's TestClient runs the lifespan), with a real Mosquitto and the
real bundled MiniLM ONNX model (small and quick to load); Gemma stays out of it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.api.app import create_app
from agent.catalog import BUNDLED
from agent.config import AgentSettings, LinkSettings
from agent.store import ModelStore
from models.wire import Command, CommandKind, DesiredModel, DesiredState, encode
from scripts.servers import MosquittoBroker
from tests.agent.link_support import (
    Watcher,
    authorize,
    controller_client,
    shared_director,
    write_identity,
)
from tests.polling import wait_until

pytestmark = pytest.mark.integration  # a real Mosquitto and the real MiniLM

WITHIN_S = 30.0  # seconds: the app's background tasks load MiniLM and reach the broker
DEVICE = "dev-app-1"
PASSWORD = "app-secret"
DESIRED = f"edgefleet/v1/devices/{DEVICE}/desired"
CMD = f"edgefleet/v1/devices/{DEVICE}/cmd"


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    ModelStore(root).install_bundled(BUNDLED["minilm"])
    return root


def publish(broker: MosquittoBroker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async def send() -> None:
        async with controller_client(broker, "app-test-publisher") as client:
            await client.publish(topic, payload, qos=1, retain=retain)

    asyncio.run(send())


def test_desired_state_drives_the_models_and_survives_a_restart_without_the_broker(
    broker: MosquittoBroker, tmp_path: Path, minilm_store: Path
) -> None:
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    write_identity(state_dir, broker, DEVICE, PASSWORD)
    settings = AgentSettings(
        store_dir=minilm_store,
        models=[],
        fleet=LinkSettings(
            state_dir=state_dir,
            backoff_initial_s=0.05,
            backoff_max_s=0.3,
            trust_root=shared_director().root_file,
        ),
    )
    desired = DesiredState(
        device_id=DEVICE,
        version=1,
        models=[DesiredModel(name="minilm"), DesiredModel(name="ghost", version="2")],
    )
    publish(broker, DESIRED, shared_director().sign(desired), retain=True)

    loop = asyncio.new_event_loop()
    watcher = Watcher(broker)
    loop.run_until_complete(watcher.start())

    def collected(channel: str) -> list[dict[str, Any]]:
        loop.run_until_complete(asyncio.sleep(0.01))  # let the watcher's task read
        return [m.json() for m in watcher.on(channel)]

    with TestClient(create_app(settings)) as client:
        fleet = wait_until(
            lambda: (s := client.get("/v1/fleet").json())["applied_desired_version"] == 1 and s,
            "desired state 1 applied",
            within_s=WITHIN_S,
        )
        assert fleet["device_id"] == DEVICE
        wait_until(
            lambda: "minilm" in client.get("/readyz").json()["models"],
            "minilm served",
            within_s=WITHIN_S,
        )
        readyz = client.get("/readyz").json()
        assert readyz["status"] == "failed"
        assert "ghost" in readyz["failed"]
        emb = client.post("/v1/embeddings", json={"model": "minilm", "input": ["hello"]})
        assert emb.status_code == 200

        def ready_reports() -> list[dict[str, Any]]:
            return [
                r
                for r in collected("reported")
                if r.get("desired_version") == 1
                and {"name": "minilm", "state": "ready"}.items()
                <= next((m for m in r["models"] if m["name"] == "minilm"), {}).items()
            ]

        report = wait_until(ready_reports, "a report of minilm ready", within_s=WITHIN_S)[-1]
        models = {m["name"]: m for m in report["models"]}
        assert models["minilm"]["runtime"] == "onnxruntime"
        assert models["ghost"]["state"] == "missing"
        assert not report["converged"]
        assert report["device"]["hostname"]
        publish(
            broker, CMD, encode(Command(device_id=DEVICE, id="flush-0001", kind=CommandKind.FLUSH))
        )
        batch = wait_until(lambda: collected("telemetry"), "a flushed sample", within_s=WITHIN_S)[0]
        sample = batch["samples"][0]
        assert sample["requests"] >= 1
        assert sample["latency_p50_ms"] > 0
        assert sample["model_memory_bytes"] > 0
        events = wait_until(
            lambda: [e for e in collected("events") if e["kind"] == "model_ready"],
            "a MODEL_READY event",
            within_s=WITHIN_S,
        )
        assert events[0]["data"]["model"] == "minilm"
        fleet = client.get("/v1/fleet").json()
        assert fleet["connected"]
        assert fleet["last_report_at"] is not None
    loop.run_until_complete(watcher.stop())
    loop.close()

    # Restart without the broker: the saved desired state still decides the models.
    broker.stop()
    settings_again = settings.model_copy(update={"models": []})
    with TestClient(create_app(settings_again)) as client:
        wait_until(
            lambda: "minilm" in client.get("/readyz").json()["models"],
            "minilm served",
            within_s=WITHIN_S,
        )
        fleet = client.get("/v1/fleet").json()
        assert not fleet["connected"]
        assert fleet["applied_desired_version"] == 1
        assert fleet["spool"]["durable"]


def test_without_a_fleet_the_route_says_so(minilm_store: Path, tmp_path: Path) -> None:
    settings = AgentSettings(
        store_dir=minilm_store, models=[], fleet=LinkSettings(state_dir=tmp_path / "none")
    )
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/fleet").json()
    assert body["enabled"] is False
    assert not (tmp_path / "none").exists()  # nothing is written for a device not in a fleet
