"""The whole fleet under faults: a real controller, a real Mosquitto, a real agent and model.

Each test counts: every telemetry sample the agent numbered must be in the
controller's database exactly once (no gap, no duplicate in the sequence numbers),
and the requests the telemetry adds up must equal the requests the test sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.servers import Controller, MosquittoBroker, free_port, running_controller
from tests.conftest import AgentProcess, start_agent
from tests.polling import wait_until

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"
EVERY_S = 0.2  # seconds between probes: each asks the controller or the agent over HTTP


def admin(controller: Controller) -> httpx.Client:
    token = (controller.data_dir / "admin-token").read_text().strip()
    return httpx.Client(
        base_url=controller.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def fleet_status(agent: AgentProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{agent.url}/v1/fleet", timeout=5).json()
    return body


def samples(controller: Controller, device_id: str) -> list[dict[str, Any]]:
    with admin(controller) as api:
        body = api.get(
            f"/api/v1/devices/{device_id}/telemetry",
            params={"raw": "true", "since": "2000-01-01T00:00:00Z", "limit": 10000},
        ).json()
    assert not body["truncated"]
    return list(body["samples"])


def assert_exactly_once(rows: list[dict[str, Any]]) -> None:
    seqs = [row["seq"] for row in rows]
    assert len(seqs) == len(set(seqs)), "a sample was stored twice"
    assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), (
        f"samples missing: {sorted(set(range(min(seqs), max(seqs) + 1)) - set(seqs))}"
    )


def drained(agent: AgentProcess) -> bool:
    status = fleet_status(agent)
    return bool(status["connected"]) and status["spool"]["entries"] == 0


@contextmanager
def enrolled_agent(
    tmp_path: Path,
    controller: Controller,
    model_store: Path,
    models: list[dict[str, Any]],
    *,
    token: str | None = None,
) -> Iterator[AgentProcess]:
    fleet: dict[str, Any] = {
        "url": controller.url,
        "state_dir": tmp_path / "agent-state",
        "telemetry_interval_s": 1.0,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 2.0,
    }
    if token is not None:
        fleet["token"] = token
    agent = start_agent(tmp_path, model_store, settings={"fleet": fleet}, models=models)
    try:
        yield agent
    finally:
        agent.stop()


def new_token(controller: Controller) -> str:
    created = json.loads(controller.cli("tokens", "create", "--json"))
    return str(created["secret"])


def device_id_of(tmp_path: Path) -> str:
    identity = json.loads((tmp_path / "agent-state" / "identity.json").read_text())
    return str(identity["device_id"])


def mosquitto_controller(tmp_path: Path, broker: MosquittoBroker, database_url: str) -> Any:
    return running_controller(
        tmp_path,
        database_url,
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
    )  # fmt: skip


def online_with_samples(controller: Controller, device_id: str, at_least: int) -> bool:
    with admin(controller) as api:
        detail = api.get(f"/api/v1/devices/{device_id}").json()
    return bool(detail["online"]) and len(samples(controller, device_id)) >= at_least


def test_broker_outage_of_30_s_loses_no_request_and_no_sample(
    tmp_path: Path, broker: MosquittoBroker, model_store: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with (
        mosquitto_controller(tmp_path, broker, database_url) as controller,
        enrolled_agent(
            tmp_path, controller, model_store, [{"name": LLM}], token=new_token(controller)
        ) as agent,
    ):
        device = device_id_of(tmp_path)
        wait_until(
            lambda: online_with_samples(controller, device, 2), "the first samples", every_s=EVERY_S
        )

        body = {"model": LLM, "prompt": "Edge", "max_tokens": 2, "temperature": 0}
        sent = 0

        def ask() -> None:
            nonlocal sent
            reply = httpx.post(f"{agent.url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            sent += 1

        ask()
        broker.stop()
        outage_ends = time.monotonic() + 30
        while time.monotonic() < outage_ends:
            ask()  # every request during the outage must succeed
        spooled = fleet_status(agent)["spool"]["entries"]
        assert not fleet_status(agent)["connected"]
        broker.start()
        ask()

        wait_until(lambda: drained(agent), "the spool to drain", within_s=90, every_s=EVERY_S)
        # the window holding the last request closes within one interval
        wait_until(
            lambda: sum(r["requests"] for r in samples(controller, device)) >= sent,
            "every request to be counted",
            every_s=EVERY_S,
        )
        rows = samples(controller, device)
        assert_exactly_once(rows)
        assert sum(r["requests"] for r in rows) == sent
        assert spooled >= 20, f"only {spooled} entries spooled in a 30 s outage"
        assert fleet_status(agent)["dropped"] == {"samples": 0, "events": 0}


def test_agent_killed_mid_spool_loses_nothing(
    tmp_path: Path, broker: MosquittoBroker, model_store: Path, postgres_url: str
) -> None:
    with mosquitto_controller(tmp_path, broker, postgres_url) as controller:
        token = new_token(controller)
        with enrolled_agent(tmp_path, controller, model_store, [], token=token) as agent:
            device = device_id_of(tmp_path)
            wait_until(
                lambda: online_with_samples(controller, device, 1),
                "the first sample",
                every_s=EVERY_S,
            )
            broker.stop()
            wait_until(
                lambda: fleet_status(agent)["spool"]["entries"] >= 5,
                "a spool backlog",
                every_s=EVERY_S,
            )
            agent.proc.kill()  # SIGKILL: no clean shutdown, no flush
            agent.proc.wait()
        broker.start()
        with enrolled_agent(tmp_path, controller, model_store, []) as agent:
            assert device_id_of(tmp_path) == device  # the same identity, no new enrollment
            wait_until(lambda: drained(agent), "the spool to drain", within_s=90, every_s=EVERY_S)
            stored = wait_until(
                lambda: samples(controller, device), "samples stored", every_s=EVERY_S
            )
            last = max(r["seq"] for r in stored)
            wait_until(
                lambda: max(r["seq"] for r in samples(controller, device)) >= last + 2,
                "samples after the restart",
                every_s=EVERY_S,
            )
        rows = samples(controller, device)
        assert_exactly_once(rows)
        with admin(controller) as api:
            assert api.get("/api/v1/devices", params={"limit": 100}).json()["total"] == 1


def in_sync(controller: Controller, device_id: str) -> bool:
    with admin(controller) as api:
        detail = api.get(f"/api/v1/devices/{device_id}").json()
    return bool(detail["online"] and detail["drift"]["in_sync"])


def test_controller_restart_with_the_embedded_broker_devices_reconnect_state_intact(
    tmp_path: Path, model_store: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'controller' / 'fleet.db'}"
    args = ("--broker-port", str(free_port()))  # the embedded broker, on a fixed port
    with running_controller(tmp_path, database_url, *args) as controller:
        agent_cm = enrolled_agent(
            tmp_path, controller, model_store, [{"name": "minilm"}], token=new_token(controller)
        )
        with agent_cm as agent:
            device = device_id_of(tmp_path)
            with admin(controller) as api:
                desired = {"models": [{"name": "minilm"}]}
                assert api.put(f"/api/v1/devices/{device}/desired", json=desired).is_success
            wait_until(
                lambda: in_sync(controller, device), "desired and reported in sync", every_s=EVERY_S
            )

            controller.proc.terminate()  # a restart; the embedded broker stops with it
            controller.proc.wait(timeout=30)
            wait_until(
                lambda: not fleet_status(agent)["connected"], "the agent to notice", every_s=EVERY_S
            )
            reply = httpx.post(
                f"{agent.url}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=30
            )
            assert reply.status_code == 200  # serving never waits on the fleet

            with running_controller(tmp_path, database_url, *args) as restarted:
                wait_until(
                    lambda: fleet_status(agent)["connected"],
                    "the agent to reconnect",
                    every_s=EVERY_S,
                )
                wait_until(
                    lambda: in_sync(restarted, device),
                    "the device online and in sync",
                    every_s=EVERY_S,
                )
                with admin(restarted) as api:
                    detail = api.get(f"/api/v1/devices/{device}").json()
                assert detail["desired"]["version"] == 1
                assert [m["name"] for m in detail["reported"]["models"]] == ["minilm"]
                wait_until(lambda: drained(agent), "the spool to drain", every_s=EVERY_S)
                # drained means the broker has them; the controller stores them a batch later
                stored = wait_until(
                    lambda: samples(restarted, device), "samples stored", every_s=EVERY_S
                )
                assert_exactly_once(stored)
