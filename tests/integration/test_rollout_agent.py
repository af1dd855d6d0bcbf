"""A staged rollout to a real agent serving the real Gemma: a good version, then a bad one.

The controller gates the good version on the agent's own telemetry (error rate while a
local app chats with it) and counts the device updated only once the agent reports the
new version served after its golden prompts; the bad version fails its golden prompt on
the device, the abort rule fires, and the device is given its previous model back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.update_support import (
    LLM,
    UPDATE_S,
    Artifacts,
    Fleet,
    make_artifacts,
    update_fleet,
)
from tests.polling import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Artifacts:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"), model_store)


@pytest.fixture
def fleet(tmp_path: Path, model_store: Path) -> Iterator[Fleet]:
    with update_fleet(tmp_path, model_store) as running:
        yield running


def start(fleet: Fleet, version: str, **spec: Any) -> str:
    body = {
        "change": {"model": LLM, "version": version},
        "target": {"devices": [fleet.device_id]},
        **spec,
    }
    with fleet.api() as api:
        response = api.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def status(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    with fleet.api() as api:
        detail: dict[str, Any] = api.get(f"/api/v1/rollouts/{rollout_id}").json()
    return detail


def finished(fleet: Fleet, rollout_id: str) -> dict[str, Any] | None:
    detail = status(fleet, rollout_id)
    return detail if detail["status"] in {"completed", "aborted"} else None


class Chatter:
    """A local app chatting with the agent, so its telemetry has requests to gate on."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.answered = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._fleet.chat()
                self.answered += 1
            except (AssertionError, httpx.HTTPError):
                pass  # the model is being swapped: a request may fail, the gate counts it

    def __enter__(self) -> Chatter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def test_a_real_agent_takes_a_gated_rollout_and_is_rolled_back_from_a_bad_one(
    fleet: Fleet, artifacts: Artifacts
) -> None:
    fleet.push(artifacts.original, "1.0")
    sha11 = fleet.push(artifacts.v11, "1.1")
    gate = {
        "metric": "error_rate",
        "window_s": 20,
        "min_samples": 2,
        "max_value": 0.2,
        "on_insufficient_data": "wait",
    }
    with Chatter(fleet) as chatter:
        good = start(fleet, "1.1", soak_s=6, check_interval_s=2, gates=[gate])
        detail = wait_until(
            lambda: finished(fleet, good),
            "the 1.1 rollout to finish",
            within_s=UPDATE_S + 60,
            every_s=1.0,
        )
    assert detail["status"] == "completed", detail["reason"]
    assert chatter.answered > 0
    assert fleet.served() == {"version": "1.1", "sha256": sha11}
    passed = [c for c in detail["gate_checks"] if c["verdict"] == "pass"]
    assert passed, detail["gate_checks"]
    assert passed[0]["evidence"]["updated"]["samples"] >= 2  # the agent's own telemetry
    assert fleet.events("update_healthy")  # what made it count as updated

    # 1.2 fails its golden prompt on the device: the rule aborts, 1.1 is desired again.
    fleet.push(artifacts.v12, "1.2", golden=[{"prompt": "2+2=", "expect": "Zanzibar"}])
    bad = start(
        fleet, "1.2", abort_rules=[{"failure": "health_check_failed", "threshold_count": 1}]
    )
    detail = wait_until(
        lambda: finished(fleet, bad), "the 1.2 rollout to end", within_s=UPDATE_S, every_s=1.0
    )
    assert detail["status"] == "aborted"
    assert "health_check_failed" in detail["reason"]
    with fleet.api() as api:
        [device] = api.get(f"/api/v1/rollouts/{bad}/devices").json()
        desired = api.get(f"/api/v1/devices/{fleet.device_id}/desired").json()
    assert (device["state"], device["failure"]) == ("rolled_back", "health_check_failed")
    assert desired["models"][0]["target"]["sha256"] == sha11  # its previous model, signed anew
    assert fleet.served() == {"version": "1.1", "sha256": sha11}
    assert fleet.chat()
    assert not fleet.events("model_failed")
