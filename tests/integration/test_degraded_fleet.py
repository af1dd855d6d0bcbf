"""Degraded mode as a fleet admin sees it: policy, assignment, a failing model, an alert.

A real controller on a real Mosquitto and one real agent serving the real Gemma 3 270M
and MiniLM, in group ``lab``. The admin writes a fallback policy (a cache tier on
MiniLM, then fixed rules) with the CLI, assigns it to the group and sees the device
enforce it; a second policy naming a model the device lacks is refused for it. Then
the drill: every decode of Gemma fails (``/v1/faults``), the device still answers
(from the rules tier, marked degraded), the controller lists it as degraded and
raises a ``group_degraded`` alert; the fault goes, the primary answers again, the
breaker closes and the alert clears.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.servers import MosquittoBroker, running_controller
from tests.conftest import start_agent
from tests.integration.test_fleet_system import EVERY_S
from tests.integration.update_support import LLM, Fleet
from tests.polling import wait_until

pytestmark = pytest.mark.integration

GROUP = "lab"
EMBEDDER = "minilm"
BUSY = "The assistant is busy; please try again in a minute."
# One degraded device of one is enough for the group's alert, checked twice a second.
ALERTS = {
    "EDGEFLEET_FLEET_DEGRADED_ALERT_MIN_DEVICES": "1",
    "EDGEFLEET_FLEET_DEGRADED_ALERT_SHARE": "0.5",
    "EDGEFLEET_FLEET_DEGRADED_ALERT_INTERVAL_S": "0.5",
}
POLICY_TOML = f"""\
description = "Lab boards: Gemma falls back to past answers, then a fixed reply"

[breaker]
minimum_calls = 2
sliding_window = 4
wait_in_open = 2.0

[chains."{LLM}"]
retry_after = 5

[[chains."{LLM}".tiers]]
kind = "cache"
embedder = "{EMBEDDER}"
threshold = 0.95

[[chains."{LLM}".tiers]]
kind = "rules"
default = "{BUSY}"
"""
# Far in meaning from the healthy prompt, so the cache tier has no answer for it.
FAILING_PROMPT = "What are your opening hours on Sunday?"


@dataclass
class DrillFleet(Fleet):
    """The update fleet's helpers, with fault injection on the agent."""

    def agent_settings(self) -> dict[str, Any]:
        return {**super().agent_settings(), "fault_injection": True}

    def ask(self, text: str = "Say hi") -> httpx.Response:
        response = httpx.post(
            f"{self.agent.url}/v1/chat/completions",
            json={"model": LLM, "messages": [{"role": "user", "content": text}], "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response

    def get(self, path: str, **params: Any) -> Any:
        with self.api() as api:
            response = api.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any], status: int = 200) -> Any:
        with self.api() as api:
            response = api.post(path, json=body)
        assert response.status_code == status, response.text
        return response.json()

    def degraded_devices(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/devices", degraded="true")["items"])

    def alerts(self, state: str = "open") -> list[dict[str, Any]]:
        items = self.get("/api/v1/alerts", state=state)["items"]
        return [a for a in items if a["subject"] == f"group:{GROUP}"]

    def set_fault(self, **fault: Any) -> None:
        url = f"{self.agent.url}/v1/faults/{LLM}"
        response = httpx.put(url, json=fault, timeout=10)
        assert response.status_code == 200, response.text

    def clear_fault(self) -> None:
        response = httpx.delete(f"{self.agent.url}/v1/faults/{LLM}", timeout=10)
        assert response.status_code == 204, response.text


@contextmanager
def drill_fleet(tmp_path: Path, model_store: Path, broker: MosquittoBroker) -> Iterator[DrillFleet]:
    """The controller on ``broker``, and an agent enrolled into group ``lab``, online."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    database = f"sqlite:///{tmp_path / 'fleet.db'}"
    with running_controller(
        tmp_path,
        database,
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
        env=ALERTS,
    ) as controller:  # fmt: skip
        fleet = DrillFleet(controller, None, "", store, tmp_path)  # type: ignore[arg-type]
        fleet.post("/api/v1/groups", {"name": GROUP}, status=201)
        token = fleet.post("/api/v1/tokens", {"group": GROUP}, status=201)["secret"]
        settings = fleet.agent_settings()
        settings["fleet"]["token"] = token
        models = [{"name": LLM}, {"name": EMBEDDER}]
        fleet.agent = start_agent(tmp_path, store, settings=settings, models=models)
        try:
            identity = tmp_path / "agent-state" / "identity.json"
            wait_until(identity.exists, "the agent to enroll", every_s=EVERY_S)
            fleet.device_id = json.loads(identity.read_text())["device_id"]
            wait_until(
                lambda: fleet.reported().get("status") == "online",
                "the device online",
                every_s=EVERY_S,
                detail=fleet.agent.tail,
            )
            yield fleet
        finally:
            fleet.agent.stop()


def enforced_digest(fleet: DrillFleet) -> str | None:
    policy = fleet.reported().get("policy")
    return policy["digest"] if policy else None


def statuses(fleet: DrillFleet, policy: str) -> dict[str, dict[str, Any]]:
    detail = fleet.get(f"/api/v1/policies/{policy}")
    return {d["device_id"]: d for d in detail["devices"]}


def assign_and_enforce(fleet: DrillFleet) -> str:
    """The admin's policy, created and assigned with the CLI; the device enforces it."""
    device = fleet.device_id
    served = {"models": [{"name": LLM}, {"name": EMBEDDER}]}
    with fleet.api() as api:
        response = api.put(f"/api/v1/devices/{device}/desired", json=served)
    assert response.status_code == 202, response.text

    file = fleet.tmp / "lab-gemma.toml"
    file.write_text(POLICY_TOML)
    created = json.loads(
        fleet.controller.cli("policies", "create", "lab-gemma", "--file", str(file), "--json")
    )
    assert created["version"] == 1
    digest = str(created["digest"])
    assigned = json.loads(
        fleet.controller.cli("policies", "assign", "lab-gemma", "--group", GROUP, "--json")
    )
    assert assigned["digest"] == digest
    assert assigned["updated"] == [device], assigned
    assert (assigned["ineligible"], assigned["skipped"]) == ([], []), assigned

    wait_until(
        lambda: enforced_digest(fleet) == digest,
        "the device to report the policy's digest",
        every_s=EVERY_S,
        detail=fleet.agent.tail,
    )
    status = statuses(fleet, "lab-gemma")[device]
    assert (status["status"], status["version"]) == ("enforcing", 1), status
    applied = wait_until(
        lambda: fleet.events("policy_applied"), "a policy_applied event", every_s=EVERY_S
    )
    assert applied[0]["data"]["digest"] == digest, applied
    assert applied[0]["data"]["name"] == "lab-gemma", applied
    return digest


def refuse_ineligible(fleet: DrillFleet, digest: str) -> None:
    """A policy naming a model the device lacks leaves it as it was, with the reason."""
    device = fleet.device_id
    desired_before = fleet.reported()["desired_version"]
    nope = {
        "name": "lab-gemma-nope",
        "chains": {LLM: {"tiers": [{"kind": "model", "model": "gemma-nope"}]}},
    }
    fleet.post("/api/v1/policies", nope, status=201)
    refused = fleet.post("/api/v1/policies/lab-gemma-nope/assign", {"group": GROUP})
    assert (refused["updated"], refused["assigned"]) == ([], []), refused
    [ineligible] = refused["ineligible"]
    assert ineligible["device"] == device, refused
    assert any("gemma-nope" in reason for reason in ineligible["reasons"]), refused
    assert statuses(fleet, "lab-gemma-nope")[device]["status"] == "ineligible"

    after = fleet.reported()
    assert after["desired_version"] == desired_before, "the device was sent a new state"
    assert after["desired"]["fallback"]["name"] == "lab-gemma"
    assert enforced_digest(fleet) == digest

    # The admin gives the group its working policy back: nothing to send.
    back = fleet.post("/api/v1/policies/lab-gemma/assign", {"group": GROUP})
    assert (back["unchanged"], back["updated"]) == ([device], []), back
    assert statuses(fleet, "lab-gemma")[device]["status"] == "enforcing"


def assert_rules_answer(response: httpx.Response) -> None:
    assert response.headers["x-edgefleet-served-by"] == "rules", response.headers
    assert response.headers["x-edgefleet-degraded"] == "true", response.headers
    marks = response.json()["edgefleet"]
    assert (marks["degraded"], marks["tier"], marks["served_by"]) == (True, "rules", "rules")
    assert response.json()["choices"][0]["message"]["content"] == BUSY


def degrade(fleet: DrillFleet) -> dict[str, Any]:
    """Every decode of Gemma fails: rules answer, the controller shows it, the alert opens."""
    fleet.set_fault(error_rate=1.0)

    def open_on_controller() -> list[dict[str, Any]]:
        # Each round asks again: a half-open probe fails and opens the breaker again.
        assert_rules_answer(fleet.ask(FAILING_PROMPT))
        listed = {item["id"]: item["degraded"] for item in fleet.degraded_devices()}
        return [
            e
            for e in listed.get(fleet.device_id, [])
            if (e["model"], e["breaker"]) == (LLM, "open")
        ]

    [entry] = wait_until(
        open_on_controller,
        "the controller to list the device as degraded, breaker open",
        every_s=EVERY_S,
        detail=fleet.agent.tail,
    )
    assert entry["kind"] == "error", entry

    opened = wait_until(
        lambda: fleet.events("breaker_opened"), "a breaker_opened event", every_s=EVERY_S
    )
    assert (opened[0]["data"]["model"], opened[0]["data"]["kind"]) == (LLM, "error"), opened

    [alert] = wait_until(fleet.alerts, "an open group_degraded alert", every_s=EVERY_S)
    assert (alert["kind"], alert["severity"]) == ("group_degraded", "warning"), alert
    assert (alert["state"], alert["cleared_at"]) == ("open", None), alert
    assert alert["data"]["device_ids"] == [fleet.device_id], alert
    assert alert["message"].startswith(f"1 of 1 devices in {GROUP} is degraded"), alert
    [tally] = alert["data"]["models"]  # "open", or "half_open" if a probe is due by now
    assert (tally["model"], tally["kinds"]) == (LLM, ["error"]), alert
    return dict(alert)


def recover(fleet: DrillFleet, alert: dict[str, Any]) -> None:
    """The fault goes: the primary answers, the breaker closes, the alert clears."""
    fleet.clear_fault()

    def primary_answers() -> bool:
        response = fleet.ask()
        if response.headers["x-edgefleet-served-by"] != LLM:
            return False
        assert response.headers["x-edgefleet-degraded"] == "false", response.headers
        return response.json()["edgefleet"]["degraded"] is False

    wait_until(primary_answers, "Gemma to answer again", every_s=EVERY_S, detail=fleet.agent.tail)
    # Half-open lets probe calls through; all good closes it: keep asking until it does.
    wait_until(
        lambda: primary_answers() and fleet.degraded_devices() == [],
        "the device to leave ?degraded=true",
        every_s=EVERY_S,
        detail=fleet.agent.tail,
    )
    assert fleet.reported()["degraded"] == []
    closed = wait_until(
        lambda: fleet.events("breaker_closed"), "a breaker_closed event", every_s=EVERY_S
    )
    assert closed[0]["data"]["model"] == LLM, closed

    def cleared() -> list[dict[str, Any]]:
        return [a for a in fleet.alerts("all") if a["id"] == alert["id"] and a["cleared_at"]]

    [done] = wait_until(cleared, "the group_degraded alert to clear", every_s=EVERY_S)
    assert done["state"] == "cleared", done
    assert fleet.alerts() == [], "an alert is still open"
    audit = fleet.get("/api/v1/audit", subject=f"group:{GROUP}")
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("alert.cleared", "controller"),
        ("alert.raised", "controller"),
        ("group.create", "admin"),
    ], audit


def test_admin_assigns_a_policy_and_sees_a_device_degrade_and_recover(
    tmp_path: Path, model_store: Path, broker: MosquittoBroker
) -> None:
    with drill_fleet(tmp_path, model_store, broker) as fleet:
        digest = assign_and_enforce(fleet)
        refuse_ineligible(fleet, digest)

        healthy = fleet.ask()  # the primary answers while healthy, unmarked
        assert healthy.headers["x-edgefleet-served-by"] == LLM, healthy.headers
        assert healthy.headers["x-edgefleet-degraded"] == "false", healthy.headers
        assert fleet.degraded_devices() == []
        assert fleet.alerts() == []

        alert = degrade(fleet)
        recover(fleet, alert)
        assert enforced_digest(fleet) == digest  # the drill changed no policy
