"""The rollouts API: every bad input is a 4xx naming the field and stores nothing; actions audit.

The engine's decisions are tested in ``test_rollout_engine.py``; here the routes, their
errors and their answers, on the running app (SQLite and PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.tables import Device, ModelArtifact, PolicyRow, RolloutDevice
from models.policy import FallbackPolicy, PolicyRef, policy_digest
from models.wire import ModelState, ReportedModel, ReportedState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import START, Clock, create_group, enroll, error, error_field
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


# -- a fallback policy ----------------------------------------------------------------

CHAINS: dict[str, Any] = {MODEL: {"tiers": [{"kind": "model", "model": "gemma3-small"}]}}


def store_policy(engine: Engine, version: int, name: str = "edge-default") -> PolicyRef:
    """A policy version as the policy store writes it."""
    policy = FallbackPolicy.model_validate({"name": name, "version": version, "chains": CHAINS})
    body_json = policy.model_dump(mode="json")
    with Session(engine) as session:
        session.add(
            PolicyRow(
                name=name,
                version=version,
                body=body_json,
                digest=policy_digest(body_json),
                created_by="admin",
                created_at=START,
            )
        )
        session.commit()
    return policy.ref()


def serve(engine: Engine, device_id: str, *models: str) -> None:
    """The device reports serving these models (the policy's eligibility reads them)."""
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.reported = ReportedState(
            device_id=device_id,
            converged=True,
            agent_version="0.9",
            models=[ReportedModel(name=m, state=ModelState.READY) for m in models],
        ).model_dump(mode="json")
        session.add(device)
        session.commit()


def policy_body(**spec: Any) -> dict[str, Any]:
    change = {"kind": "policy", "policy": "edge-default", "version": 2}
    return body(change=change) | spec


def test_a_policy_rollout_round_trip(api: TestClient, fleet: list[str], engine: Engine) -> None:
    store_policy(engine, 1)
    ref = store_policy(engine, 2)
    created = api.post(
        "/api/v1/rollouts",
        json=policy_body(
            canary={"count": 1},
            stages={"percents": [50, 100]},
            gates=[{"metric": "fallback_rate", "max_value": 0.05, "window_s": 300}],
        ),
    )
    assert created.status_code == 201, created.text
    detail = created.json()
    assert (detail["kind"], detail["change"]) == ("policy", "policy edge-default v2")
    assert (detail["policy"], detail["policy_version"]) == ("edge-default", 2)
    assert (detail["model"], detail["version"]) == (None, None)
    assert detail["spec"]["change"] == {"kind": "policy", "policy": "edge-default", "version": 2}
    listed = api.get("/api/v1/rollouts").json()
    assert [(r["id"], r["change"]) for r in listed] == [(detail["id"], "policy edge-default v2")]
    devices = api.get(f"/api/v1/rollouts/{detail['id']}/devices").json()
    assert sorted(d["device_id"] for d in devices) == sorted(fleet)
    assert {(d["version"], d["variant"]) for d in devices} == {("2", None)}
    with Session(engine) as session:
        members = session.exec(select(RolloutDevice)).all()
        assert {m.target["digest"] for m in members if m.target} == {ref.digest}


def test_a_policy_rollout_without_a_version_takes_the_latest(
    api: TestClient, fleet: list[str], engine: Engine
) -> None:
    store_policy(engine, 1)
    store_policy(engine, 2)
    change = {"kind": "policy", "policy": "edge-default"}
    created = api.post("/api/v1/rollouts", json=body(change=change))
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["change"]["version"] == 2
    assert created.json()["change"] == "policy edge-default v2"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "policy", "policy": "nowhere"}, "change.policy"),
        ({"kind": "policy", "policy": "edge-default", "version": 7}, "change.version"),
        ({"kind": "policy", "policy": "Edge Default"}, "change.policy"),
        ({"kind": "policy", "policy": "edge-default", "version": 0}, "change.version"),
        ({"kind": "policy", "policy": "edge-default", "model": MODEL}, "change.model"),
        ({"kind": "config", "policy": "edge-default"}, "change"),
    ],
)
def test_a_bad_policy_change_is_a_422_naming_the_field(
    api: TestClient,
    fleet: list[str],
    engine: Engine,
    link: FakeLink,
    change: dict[str, Any],
    field: str,
) -> None:
    store_policy(engine, 1)
    response = api.post("/api/v1/rollouts", json=body(change=change))
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input"), message
    assert error_field(response) == field, message
    assert api.get("/api/v1/rollouts").json() == []
    assert link.published == []


def test_a_policy_no_device_can_enforce_is_refused_with_the_reasons(
    api: TestClient, fleet: list[str], engine: Engine
) -> None:
    store_policy(engine, 2)
    for device_id in fleet:
        serve(engine, device_id, MODEL)  # not its fallback gemma3-small
    response = api.post("/api/v1/rollouts", json=policy_body())
    status, _, message = error(response)
    assert status == 422
    assert error_field(response) == "change.policy"
    assert "gemma3-small" in message
    assert all(device_id in message for device_id in fleet)


def test_ineligible_devices_are_left_out_with_the_reason(
    api: TestClient, fleet: list[str], engine: Engine
) -> None:
    store_policy(engine, 2)
    able, unable = fleet
    serve(engine, able, MODEL, "gemma3-small")
    serve(engine, unable, MODEL)
    rollout = api.post("/api/v1/rollouts", json=policy_body()).json()["id"]
    devices = {d["device_id"]: d for d in api.get(f"/api/v1/rollouts/{rollout}/devices").json()}
    assert devices[unable]["state"] == "ineligible"
    assert "gemma3-small" in devices[unable]["detail"]
    assert devices[able]["state"] != "ineligible"


def test_a_second_policy_rollout_is_a_409_but_a_model_rollout_beside_it_is_not(
    api: TestClient, fleet: list[str], engine: Engine
) -> None:
    store_policy(engine, 1)
    store_policy(engine, 2)
    first = api.post("/api/v1/rollouts", json=policy_body()).json()["id"]
    change = {"kind": "policy", "policy": "edge-default", "version": 1}
    status, code, message = error(api.post("/api/v1/rollouts", json=body(change=change)))
    assert (status, code) == (409, "conflict")
    assert first in message
    assert "fallback policy" in message
    assert api.post("/api/v1/rollouts", json=body()).status_code == 201
