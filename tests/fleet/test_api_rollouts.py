"""The rollouts API: every bad input is a 4xx naming the field and stores nothing; actions audit.

The engine's decisions are tested in ``test_rollout_engine.py``; here the routes, their
errors and their answers, on the running app (SQLite and PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.tables import ModelArtifact
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, create_group, enroll, error, error_field
from tests.fleet.rollout_world import GB, sha

MODEL = "gemma3"


def register(engine: Engine, version: str, variant: str = "Q4_K_M", **meta: Any) -> None:
    with Session(engine) as session:
        session.add(
            ModelArtifact(
                name=MODEL,
                version=version,
                variant=variant,
                format="gguf",
                sha256=sha(f"{version}/{variant}"),
                size_bytes=1000,
                meta={"quantization": variant, **meta},
            )
        )
        session.commit()


@pytest.fixture
def fleet(api: TestClient, clock: Clock, engine: Engine) -> list[str]:
    """Two devices in group "lab", version 1.0 and 2.0 registered."""
    create_group(api, "lab")
    ids = [enroll(api, clock, group="lab")["device_id"] for _ in range(2)]
    register(engine, "1.0")
    register(engine, "2.0")
    return ids


def body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "change": {"model": MODEL, "version": "2.0"},
        "target": {"groups": ["lab"]},
    }
    return base | spec


def test_create_then_read_it_back(api: TestClient, fleet: list[str]) -> None:
    created = api.post(
        "/api/v1/rollouts",
        json=body(name="spring", canary={"count": 1}, stages={"percents": [100]}),
        headers={"X-Edgefleet-Actor": "ana"},
    )
    assert created.status_code == 201, created.text
    detail = created.json()
    assert detail["id"].startswith("ro-")
    assert (detail["model"], detail["version"], detail["status"]) == (MODEL, "2.0", "active")
    assert [s["name"] for s in detail["stage_progress"]] == ["canary", "100%"]
    assert detail["audit"][-1]["actor"] == "admin:ana"
    listed = api.get("/api/v1/rollouts").json()
    assert [r["id"] for r in listed] == [detail["id"]]
    assert sum(listed[0]["devices"].values()) == 2  # by state; the engine may have begun
    devices = api.get(f"/api/v1/rollouts/{detail['id']}/devices").json()
    assert sorted(d["device_id"] for d in devices) == sorted(fleet)
    assert {d["variant"] for d in devices} == {"Q4_K_M"}
    audit = api.get("/api/v1/audit", params={"subject": f"rollout:{detail['id']}"}).json()
    assert audit[-1]["action"] == "rollout.created"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"target": {}}, "target"),
        ({"target": {"groups": ["nowhere"]}}, "target.groups"),
        ({"target": {"facts": {"arch": ["riscv64"]}}}, "target"),
        ({"stages": {"percents": [10, 50]}}, "stages.waves.percents"),
        ({"stages": {"percents": [50, 10, 100]}}, "stages.waves.percents"),
        ({"canary": {"count": 1, "percent": 5}}, "canary"),
        (
            {"gates": [{"metric": "error_rate", "max_value": 5}]},
            "gates.0",
        ),
        (
            {"gates": [{"metric": "p95_latency_ms", "max_increase_percent": -1}]},
            "gates.0.max_increase_percent",
        ),
        ({"abort_rules": [{"threshold_percent": 150}]}, "abort_rules.0.threshold_percent"),
        ({"change": {"model": MODEL, "version": "7.0"}}, "change.version"),
        ({"maintenance_window": {"start": "25:00", "end": "04:00"}}, "maintenance_window.start"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_bad_input_is_a_422_naming_the_field_and_stores_nothing(
    api: TestClient, fleet: list[str], link: FakeLink, spec: dict[str, Any], field: str
) -> None:
    response = api.post("/api/v1/rollouts", json=body(**spec))
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input"), message
    assert error_field(response) == field, message
    assert api.get("/api/v1/rollouts").json() == []
    assert link.published == []


def test_a_yanked_version_is_refused(api: TestClient, fleet: list[str], engine: Engine) -> None:
    register(engine, "3.0")
    assert api.post(f"/api/v1/models/{MODEL}/versions/3.0/yank", json={"reason": "bad"}).is_success
    response = api.post("/api/v1/rollouts", json=body(change={"model": MODEL, "version": "3.0"}))
    status, _, message = error(response)
    assert status == 422
    assert "yanked" in message
    assert error_field(response) == "change.version"


def test_a_version_no_device_can_run_is_refused(
    api: TestClient, fleet: list[str], engine: Engine
) -> None:
    register(engine, "4.0", "F16", ram_bytes=512 * GB)
    response = api.post("/api/v1/rollouts", json=body(change={"model": MODEL, "version": "4.0"}))
    status, _, message = error(response)
    assert status == 422
    assert "no variant" in message
    assert "F16" in message


def test_a_second_rollout_of_the_model_is_a_409_naming_the_first(
    api: TestClient, fleet: list[str]
) -> None:
    first = api.post("/api/v1/rollouts", json=body()).json()["id"]
    response = api.post("/api/v1/rollouts", json=body(change={"model": MODEL, "version": "1.0"}))
    status, code, message = error(response)
    assert (status, code) == (409, "conflict")
    assert first in message


def test_actions_are_audited_with_the_reason(api: TestClient, fleet: list[str]) -> None:
    rollout = api.post("/api/v1/rollouts", json=body(soak_s=3600)).json()["id"]
    paused = api.post(f"/api/v1/rollouts/{rollout}/pause", json={"reason": "lunch"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    again = api.post(f"/api/v1/rollouts/{rollout}/pause")
    assert error(again)[0] == 409
    assert api.post(f"/api/v1/rollouts/{rollout}/approve").status_code == 409
    aborted = api.post(f"/api/v1/rollouts/{rollout}/abort", json={"reason": "wrong build"}).json()
    assert aborted["status"] == "aborted"
    assert "wrong build" in aborted["reason"]
    actions = [(e["action"], e["reason"]) for e in aborted["audit"]]
    assert ("rollout.paused", "lunch") in actions
    assert any(a == "rollout.aborted" and "wrong build" in r for a, r in actions)


def test_unknown_rollouts_and_actions(api: TestClient, fleet: list[str]) -> None:
    assert error(api.get("/api/v1/rollouts/ro-nope"))[0] == 404
    assert error(api.post("/api/v1/rollouts/ro-nope/pause"))[0] == 404
    rollout = api.post("/api/v1/rollouts", json=body()).json()["id"]
    assert error(api.post(f"/api/v1/rollouts/{rollout}/explode"))[0] == 422


def test_rollouts_need_the_admin_token(api: TestClient) -> None:
    response = api.get("/api/v1/rollouts", headers={"Authorization": "Bearer wrong"})
    assert error(response)[0] == 401
