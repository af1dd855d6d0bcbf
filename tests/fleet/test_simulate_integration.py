"""The simulator against a real controller (``edgefleet serve``) and a real Mosquitto.

A few simulated devices enroll over HTTP, connect with the credentials they were
given, report telemetry that the controller stores, answer a desired state and a
command, and say offline when stopped; a second run reuses their identities. Others
update to a registered model version the way an agent does (events, then the new
version reported), roll back when a regression rule fails the health check, and go
offline and come back. Waits poll with a deadline; nothing sleeps a fixed time hoping
something happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fleet.simulate import (
    HardwareMix,
    ModelRef,
    OfflineMode,
    RegressionRules,
    ServedModel,
    Simulation,
    SimulationConfig,
)
from fleet.simulate.identity import load_identity
from scripts import servers
from scripts.servers import MosquittoBroker, running_controller
from tests.polling import eventually, wait_until

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "simulate-admin-token-0123456789abcdef"
DEADLINE_S = 30.0


@dataclass
class Controller:
    """A running ``edgefleet serve`` and the database it writes."""

    running: servers.Controller
    database_url: str

    @property
    def url(self) -> str:
        return self.running.url

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )


@pytest.fixture
def controller(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Controller]:
    """``edgefleet serve`` on SQLite, against the test's Mosquitto, as an operator runs it."""
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with running_controller(
        tmp_path,
        database_url,
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
        env={"EDGEFLEET_FLEET_ADMIN_TOKEN": ADMIN_TOKEN},
        ready_s=60,
    ) as running:  # fmt: skip
        yield Controller(running, database_url)


async def until(check: Callable[[], Any], what: str) -> Any:
    """Wait for ``check()`` (sync or async) to be truthy (:func:`tests.polling.eventually`)."""
    return await eventually(check, what, within_s=DEADLINE_S, every_s=0.05)


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


def test_simulated_devices_speak_the_protocol_to_a_real_controller(
    controller: Controller, tmp_path: Path
) -> None:
    state_dir = tmp_path / "identities"
    devices = 3

    async def first_run() -> None:
        async with controller.api() as api:
            created = await api.post("/api/v1/tokens", json={"uses": devices})
            assert created.status_code in {200, 201}, created.text
            token = created.json()["secret"]
            simulation = Simulation(
                SimulationConfig(
                    devices=devices,
                    fleet_url=controller.url,
                    token=token,
                    interval_s=0.5,
                    state_dir=state_dir,
                    gpu_share=0.5,
                )
            )
            run = asyncio.create_task(simulation.run())
            try:
                await until(lambda: simulation.stats.phase == "running", "all connected")
                assert simulation.stats.enrolled == devices

                async def online() -> bool:
                    status = (await api.get("/api/v1/status")).json()
                    return bool(status["devices"]["online"] == devices)

                await until(online, "the controller sees every device online")
                ids = [d.identity.device_id for d in simulation.devices]
                await until(
                    lambda: (
                        all(
                            n >= 3
                            for (n,) in query(
                                controller.database_url,
                                "SELECT count(*) FROM telemetry GROUP BY device_id",
                            )
                        )
                        and len(
                            query(
                                controller.database_url, "SELECT DISTINCT device_id FROM telemetry"
                            )
                        )
                        == devices
                    ),
                    "three samples stored from every device",
                )

                # A desired state comes back as a converged report with every model ready.
                target = ids[0]
                put = await api.put(
                    f"/api/v1/devices/{target}/desired",
                    json={"models": [{"name": "gemma3-270m", "version": "1.0.0"}]},
                )
                assert put.status_code == 202, put.text
                version = put.json()["version"]

                async def converged() -> dict[str, Any] | None:
                    reported = (await api.get(f"/api/v1/devices/{target}")).json()["reported"]
                    if reported and reported.get("desired_version") == version:
                        return dict(reported)
                    return None

                reported = await until(converged, "the device reports the desired state")
                assert reported["converged"] is True
                assert [(m["name"], m["state"]) for m in reported["models"]] == [
                    ("gemma3-270m", "ready")
                ]

                # The report command makes the device publish its state again.
                reports = simulation.stats.counters.reports
                sent = await api.post(f"/api/v1/devices/{ids[1]}/commands", json={"kind": "report"})
                assert sent.status_code == 202, sent.text
                await until(
                    lambda: simulation.stats.counters.reports > reports, "a report on command"
                )
                assert simulation.stats.counters.commands == 1
            finally:
                simulation.stop()
                stats = await run
            assert stats.counters.ever_connected == devices
            assert stats.counters.disconnects == 0
            assert stats.counters.publish_failed == 0

            async def offline() -> bool:
                status = (await api.get("/api/v1/status")).json()
                return bool(status["devices"]["online"] == 0)

            await until(offline, "every device offline after a clean stop")

    asyncio.run(first_run())
    kinds = dict(query(controller.database_url, "SELECT kind, count(*) FROM events GROUP BY kind"))
    assert kinds["online"] == devices
    assert kinds["offline"] == devices  # said on the way out, not left to the last will
    last_seq = {
        device_id: seq
        for device_id, seq in query(
            controller.database_url, "SELECT device_id, max(seq) FROM telemetry GROUP BY device_id"
        )
    }
    for index in range(devices):
        saved = load_identity(state_dir, index, controller.url)
        assert saved is not None
        assert saved.next_seq == last_seq[saved.device_id] + 1

    # A second run reuses the identities: no token, no enrollment, sequence numbers go on.
    async def second_run() -> None:
        simulation = Simulation(
            SimulationConfig(
                devices=devices, fleet_url=controller.url, interval_s=0.5, state_dir=state_dir
            )
        )
        run = asyncio.create_task(simulation.run())
        try:
            await until(lambda: simulation.stats.phase == "running", "reconnected")
            await until(lambda: simulation.stats.counters.published >= devices * 2, "new samples")
        finally:
            simulation.stop()
            stats = await run
        assert stats.reused == devices
        assert stats.enrolled == 0

    asyncio.run(second_run())
    rows = query(
        controller.database_url,
        "SELECT device_id, count(*), count(DISTINCT seq), min(seq) FROM telemetry "
        "GROUP BY device_id",
    )
    for _device_id, count, distinct, first in rows:
        assert count == distinct  # no sequence number reused across runs
        assert first == 0
    assert query(controller.database_url, "SELECT count(*) FROM devices") == [(devices,)]


def test_the_cli_enrolls_reports_and_stops_cleanly_on_ctrl_c(
    controller: Controller, tmp_path: Path
) -> None:
    token = httpx.post(
        f"{controller.url}/api/v1/tokens",
        json={"uses": 2},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()["secret"]
    stats_file = tmp_path / "stats.json"
    command = [
        str(servers.EDGEFLEET),
        "simulate",
        "--devices",
        "2",
        "--token",
        token,
        "--fleet-url",
        controller.url,
        "--interval",
        "0.5",
        "--state-dir",
        str(tmp_path / "identities"),
        "--stats-file",
        str(stats_file),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        stats: dict[str, Any] = {}

        def published() -> bool:
            nonlocal stats
            assert process.poll() is None, process.communicate()[0].decode(errors="replace")
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
            return bool(stats.get("published", 0) >= 4)

        wait_until(
            published,
            "the simulator to publish 4 samples (its stats file)",
            within_s=DEADLINE_S,
            every_s=0.1,
            detail=lambda: f"no telemetry published: {stats}",
        )
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "simulation summary" in text
    final = json.loads(stats_file.read_text())
    assert final["phase"] == "done"
    assert final["enrolled"] == 2
    assert final["connected"] == 0  # every session closed
    assert final["ever_connected"] == 2


def test_devices_reconnect_after_a_broker_restart(
    controller: Controller, broker: MosquittoBroker, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with controller.api() as api:
            token = (await api.post("/api/v1/tokens", json={"uses": 2})).json()["secret"]
        simulation = Simulation(
            SimulationConfig(
                devices=2,
                fleet_url=controller.url,
                token=token,
                interval_s=0.5,
                state_dir=tmp_path / "identities",
            )
        )
        run = asyncio.create_task(simulation.run())
        counters = simulation.stats.counters
        try:
            await until(lambda: simulation.stats.phase == "running", "all connected")
            await asyncio.to_thread(broker.stop)
            await until(lambda: counters.connected == 0, "sessions lost")
            published = counters.published
            await asyncio.to_thread(broker.start)
            await until(lambda: counters.connected == 2, "reconnected")
            await until(lambda: counters.published >= published + 2, "telemetry resumes")
        finally:
            simulation.stop()
            stats = await run
        assert stats.counters.disconnects == 2
        assert stats.counters.ever_connected == 2

    asyncio.run(scenario())


# --- updates, regressions, offline devices ----------------------------------------------------

GGUF_2_0 = b"GGUF" + bytes(range(256)) * 40  # starts like a GGUF file; the registry checks that
GGUF_2_1 = b"GGUF" + bytes(range(255, -1, -1)) * 40
OLD_MODEL = ServedModel.initial(ModelRef.parse("gemma3-270m@1.0"))


async def register(api: httpx.AsyncClient, version: str, data: bytes) -> str:
    """Upload a model version to the controller's registry; its sha256."""
    response = await api.post(
        f"/api/v1/models/gemma3-270m/versions/{version}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    return hashlib.sha256(data).hexdigest()


async def set_desired(api: httpx.AsyncClient, device_id: str, version: str) -> int:
    put = await api.put(
        f"/api/v1/devices/{device_id}/desired",
        json={"models": [{"name": "gemma3-270m", "version": version}]},
    )
    assert put.status_code == 202, put.text
    return int(put.json()["version"])


async def reported(api: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    body = (await api.get(f"/api/v1/devices/{device_id}")).json()
    return dict(body["reported"] or {})


def events_of(database_url: str, device_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    rows = query(
        database_url,
        "SELECT kind, severity, data FROM events WHERE device_id = :device ORDER BY id",
        device=device_id,
    )
    return [(kind, severity, data if isinstance(data, dict) else json.loads(data or "{}"))
            for kind, severity, data in rows]  # fmt: skip


def update_kinds(database_url: str, device_id: str) -> list[str]:
    return [kind for kind, _, _ in events_of(database_url, device_id) if kind.startswith("update")]


async def token_for(controller: Controller, uses: int) -> str:
    async with controller.api() as api:
        created = await api.post("/api/v1/tokens", json={"uses": uses})
        assert created.status_code in {200, 201}, created.text
        return str(created.json()["secret"])


def test_devices_update_like_agents_and_an_offline_one_updates_when_back(
    controller: Controller,
) -> None:
    async def scenario() -> None:
        config = SimulationConfig(
            devices=3,
            fleet_url=controller.url,
            token=await token_for(controller, 3),
            interval_s=0.5,
            hardware=HardwareMix.parse(["orin-nano-8g,pi4-4g,x86-rtx3060-16g"]),
            models=(OLD_MODEL,),
            update_s=0.2,
        )
        async with controller.api() as api, Simulation(config) as sim:
            ids = [device.identity.device_id for device in sim.devices]
            online, updating, offline = ids
            # enrolled with their hardware profiles
            device = (await api.get(f"/api/v1/devices/{updating}")).json()
            assert device["device_report"]["arch"] == "aarch64"  # the Raspberry Pi
            assert device["device_report"]["gpus"] == []
            first = await until(lambda: reported(api, online), "a first report")
            assert [(m["name"], m["version"], m["state"]) for m in first["models"]] == [
                ("gemma3-270m", "1.0", "ready")
            ]
            sha = await register(api, "2.0", GGUF_2_0)

            # one device updates: the agent's events, then the new version reported
            version = await set_desired(api, updating, "2.0")

            async def updated(device_id: str, want: int) -> dict[str, Any] | None:
                state = await reported(api, device_id)
                done = state.get("desired_version") == want and state.get("converged")
                return state if done else None

            state = await until(lambda: updated(updating, version), "the update reported")
            assert [(m["version"], m["sha256"], m["state"]) for m in state["models"]] == [
                ("2.0", sha, "ready")
            ]
            await until(
                lambda: len(update_kinds(controller.database_url, updating)) >= 3,
                "three update events stored",
            )
            events = [e for e in events_of(controller.database_url, updating)
                      if e[0].startswith("update")]  # fmt: skip
            assert [kind for kind, _, _ in events] == [
                "update_verified",
                "update_installed",
                "update_healthy",
            ]
            for _, _, data in events:
                assert (data["model"], data["version"], data["sha256"]) == (
                    "gemma3-270m",
                    "2.0",
                    sha,
                )
            assert (await reported(api, online))["models"][0]["version"] == "1.0"

            # one device drops off (its last will says offline), misses its desired state...
            await sim.take_offline(offline)

            async def seen_offline() -> bool:
                body = (await api.get(f"/api/v1/devices/{offline}")).json()
                return body["online"] is False

            await until(seen_offline, "the controller sees the dropped device offline")
            wills = query(
                controller.database_url,
                "SELECT message FROM events WHERE device_id = :device AND kind = 'offline'",
                device=offline,
            )
            assert wills == [("connection lost (last will)",)]  # the broker published it
            late = await set_desired(api, offline, "2.0")
            assert sim.device(offline).desired_version is None
            assert (await reported(api, offline)).get("desired_version") is None
            # ... and updates when it is back (the retained desired state waits for it)
            await sim.bring_online(offline)
            state = await until(lambda: updated(offline, late), "the returned device updated")
            assert state["models"][0]["sha256"] == sha
            counters = sim.stats.counters
            assert (counters.updated, counters.rolled_back, counters.superseded) == (2, 0, 0)
            assert counters.offline == 0

    asyncio.run(scenario())


def test_a_regression_that_fails_the_health_check_rolls_back(controller: Controller) -> None:
    async def scenario() -> None:
        config = SimulationConfig(
            devices=1,
            fleet_url=controller.url,
            token=await token_for(controller, 1),
            interval_s=0.5,
            models=(OLD_MODEL,),
            regressions=RegressionRules.parse(["gemma3-270m@2.1:golden=fail,latency=3"]),
            update_s=0.1,
        )
        async with controller.api() as api, Simulation(config) as sim:
            [device_id] = [device.identity.device_id for device in sim.devices]
            await register(api, "2.1", GGUF_2_1)
            version = await set_desired(api, device_id, "2.1")
            await until(
                lambda: "update_rolled_back" in update_kinds(controller.database_url, device_id),
                "the rollback event stored",
            )
            assert update_kinds(controller.database_url, device_id) == [
                "update_verified",
                "update_installed",
                "update_rolled_back",
            ]
            _, severity, data = events_of(controller.database_url, device_id)[-1]
            assert severity == "error"
            assert data["reason"].startswith("health check failed: golden prompt")
            assert data["version"] == "2.1"

            async def acted_on() -> dict[str, Any] | None:
                state = await reported(api, device_id)
                return state if state.get("desired_version") == version else None

            state = await until(acted_on, "a report for the desired state")
            assert state["converged"] is False
            assert [(m["version"], m["sha256"], m["state"]) for m in state["models"]] == [
                ("1.0", OLD_MODEL.sha256, "ready")
            ]
            assert sim.device(device_id).effects.latency == 1.0  # 2.1 never served

            # offline with a goodbye, then without a word: the will fires in neither case,
            # and the refused update is not tried again on return (same desired state)
            await sim.take_offline(device_id, mode=OfflineMode.CLEAN)
            await sim.bring_online(device_id)
            await sim.take_offline(device_id, mode="silent")
            await sim.bring_online(device_id)

            def said(kind: str) -> list[str]:
                return [
                    message
                    for (message,) in query(
                        controller.database_url,
                        "SELECT message FROM events WHERE device_id = :device AND kind = :kind",
                        device=device_id,
                        kind=kind,
                    )
                ]

            await until(lambda: len(said("online")) == 3, "three online events")
            assert said("offline") == ["simulated agent stopped"]
            assert sim.stats.counters.rolled_back == 1
            assert sim.stats.counters.updates_started == 1
            assert sim.stats.counters.disconnects == 0

    asyncio.run(scenario())
