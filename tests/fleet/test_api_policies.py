"""The policies API: versions, validation naming the field, assignment into desired states.

On the running app (SQLite and PostgreSQL): an eligible device gets the policy in a new
desired state, published like any other; an ineligible one is left alone and listed
with the model it lacks; a device's own assignment wins over its group's; an admin's
``desired set`` keeps the assigned policy; removing an assignment falls back to the
group's policy, or none; every action is audited.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.tables import Device, EventRow
from models.policy import policy_digest
from models.wire import DesiredState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, create_group, enroll, error, error_field

PRIMARY, SMALL = "gemma3-270m", "gemma3-270m-q2"
CHAINS: dict[str, Any] = {
    PRIMARY: {
        "tiers": [
            {"kind": "model", "model": SMALL, "when": ["out_of_memory"]},
            {"kind": "model", "model": PRIMARY, "device": "cpu", "when": ["gpu_fault"]},
            {"kind": "rules", "rules": [{"keywords": ["hours"], "answer": "9 to 5"}]},
        ],
        "retry_after": 60,
    }
}
ANA = {"X-Edgefleet-Actor": "ana"}


def create(api: TestClient, name: str = "edge", **body: Any) -> dict[str, Any]:
    sent = {"name": name, "breaker": {"minimum_calls": 4}, "chains": CHAINS} | body
    response = api.post("/api/v1/policies", json=sent, headers=ANA)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def set_models(api: TestClient, device_id: str, *models: str, **extra: Any) -> dict[str, Any]:
    body = {"models": [{"name": m} for m in models], "config": {"max_queue": 8}} | extra
    response = api.put(f"/api/v1/devices/{device_id}/desired", json=body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()["desired"]
    return result


def stored(engine: Engine, device_id: str) -> DesiredState:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        assert device.desired is not None
        return DesiredState.model_validate(device.desired)


@pytest.fixture
def lab(api: TestClient, clock: Clock) -> tuple[str, str]:
    """Group "lab": ``able`` has the small model, ``short`` only the primary."""
    create_group(api, "lab")
    able, short = (enroll(api, clock, group="lab")["device_id"] for _ in range(2))
    set_models(api, able, PRIMARY, SMALL)
    set_models(api, short, PRIMARY)
    return able, short


def test_create_numbers_versions_and_stores_the_digest(api: TestClient) -> None:
    first = create(api, description="for the lab")
    second = create(api, chains={})
    assert (first["name"], first["version"], second["version"]) == ("edge", 1, 2)
    assert first["body"]["breaker"]["minimum_calls"] == 4
    assert first["digest"] == policy_digest(first["body"])
    assert first["created_by"] == "admin:ana"
    assert [v["version"] for v in second["versions"]] == [1, 2]
    old = api.get("/api/v1/policies/edge", params={"version": 1}).json()
    assert old["body"] == first["body"]
    assert old["description"] == "for the lab"
    listed = api.get("/api/v1/policies").json()
    assert [(p["name"], p["version"], p["versions"]) for p in listed] == [("edge", 2, 2)]
    status, _, message = error(api.get("/api/v1/policies/edge", params={"version": 9}))
    assert status == 404
    assert "no version 9" in message
    assert error(api.get("/api/v1/policies/nope"))[0] == 404


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"breaker": {"minimum_calls": 30, "sliding_window": 20}}, "breaker", "minimum_calls"),
        ({"breaker": {"failure_rate_threshold": 150}}, "breaker.failure_rate_threshold", ""),
        (
            {"chains": {PRIMARY: {"tiers": [{"kind": "model", "model": PRIMARY}]}}},
            f"chains.{PRIMARY}.tiers.0.model",
            "itself",
        ),
        (
            {"chains": {PRIMARY: {"tiers": [{"kind": "model"}]}}},
            f"chains.{PRIMARY}.tiers.0.model",
            "",
        ),
        ({"chains": {PRIMARY: {"tiers": [{"kind": "rules"}]}}}, f"chains.{PRIMARY}.tiers.0", ""),
        ({"name": "Not A Name"}, "name", ""),
        ({"surprise": 1}, "surprise", ""),
    ],
)
def test_an_invalid_policy_is_a_422_naming_the_field_and_stores_nothing(
    api: TestClient, body: dict[str, Any], field: str, words: str
) -> None:
    response = api.post("/api/v1/policies", json={"name": "edge", "chains": CHAINS} | body)
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input"), message
    assert error_field(response) == field, message
    assert words in message
    assert api.get("/api/v1/policies").json() == []


def test_assign_to_a_group_updates_the_eligible_and_lists_the_ineligible(
    api: TestClient, lab: tuple[str, str], link: FakeLink, engine: Engine
) -> None:
    able, short = lab
    policy = create(api)
    before_short = stored(engine, short)
    published_before = len(link.published)

    response = api.post("/api/v1/policies/edge/assign", json={"group": "lab"}, headers=ANA)

    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["policy"], result["version"], result["scope"]) == ("edge", 1, "group")
    assert result["assigned"] == [able]
    assert result["ineligible"] == [
        {
            "device": short,
            "reasons": [f"chain for {PRIMARY} names {SMALL}, which this device does not have"],
        }
    ]
    assert [(d["device_id"], d["version"], d["published"]) for d in result["desired"]] == [
        (able, 2, True)
    ]
    new = stored(engine, able)
    assert new.version == 2
    assert new.fallback == policy["body"]
    assert [m.name for m in new.models] == [PRIMARY, SMALL]
    assert new.config == {"max_queue": 8}
    assert link.published[published_before:] == [new]  # signed and published by the link
    assert stored(engine, short) == before_short
    # Again: nothing changes, nothing is re-issued.
    again = api.post("/api/v1/policies/edge/assign", json={"group": "lab"}).json()
    assert (again["updated"], again["unchanged"]) == ([], [able])
    assert len(link.published) == published_before + 1


def test_show_and_list_report_each_device(
    api: TestClient, lab: tuple[str, str], engine: Engine, clock: Clock
) -> None:
    able, short = lab
    policy = create(api)
    api.post("/api/v1/policies/edge/assign", json={"group": "lab"})
    third = enroll(api, clock, group="lab")["device_id"]
    set_models(api, third, PRIMARY, SMALL)

    statuses = {d["device_id"]: d for d in api.get("/api/v1/policies/edge").json()["devices"]}
    assert {k: v["status"] for k, v in statuses.items()} == {
        able: "pending",
        short: "ineligible",
        third: "pending",
    }
    assert SMALL in statuses[short]["reasons"][0]

    ref = {"name": "edge", "version": 1, "digest": policy["digest"]}
    with Session(engine) as session:
        device = session.get(Device, able)
        assert device is not None
        device.reported = {"models": [], "agent_version": "1", "policy": ref}
        session.add(device)
        session.add(
            EventRow(
                device_id=third,
                event_id="e1",
                ts=clock.now + timedelta(seconds=1),
                kind="policy_rejected",
                severity="warning",
                message="",
                data={"reason": "cache embedder minilm is not served"},
                stored_at=clock.now,
            )
        )
        session.commit()

    detail = api.get("/api/v1/policies/edge").json()
    statuses = {d["device_id"]: d for d in detail["devices"]}
    assert statuses[able]["status"] == "enforcing"
    assert statuses[able]["reported"] == ref
    assert (statuses[third]["status"], statuses[third]["reasons"]) == (
        "rejected",
        ["cache embedder minilm is not served"],
    )
    assert [(a["scope"], a["target"], a["version"]) for a in detail["assignments"]] == [
        ("group", "lab", 1)
    ]
    [summary] = api.get("/api/v1/policies").json()
    assert (summary["assignments"], summary["devices_assigned"], summary["devices_enforcing"]) == (
        1,
        3,
        1,
    )


def test_a_device_assignment_wins_over_its_group(
    api: TestClient, lab: tuple[str, str], engine: Engine
) -> None:
    able, _ = lab
    mine = create(api, "mine")
    create(api, "theirs", breaker={"wait_in_open": 5})
    assert api.post("/api/v1/policies/mine/assign", json={"device": able}).is_success
    result = api.post("/api/v1/policies/theirs/assign", json={"group": "lab"}).json()
    assert result["assigned"] == []
    assert result["skipped"][0]["device"] == able
    assert "own policy assignment" in result["skipped"][0]["reasons"][0]
    assert stored(engine, able).fallback == mine["body"]


def test_desired_set_keeps_the_assigned_policy(
    api: TestClient, lab: tuple[str, str], engine: Engine, clock: Clock
) -> None:
    able, short = lab
    policy = create(api)
    api.post("/api/v1/policies/edge/assign", json={"group": "lab"})

    assert set_models(api, able, PRIMARY, SMALL)["fallback"] == policy["body"]
    group = api.put(
        "/api/v1/groups/lab/desired", json={"models": [{"name": PRIMARY}, {"name": SMALL}]}
    )
    assert group.status_code == 202, group.text
    assert {d["device_id"]: d["desired"]["fallback"] for d in group.json()["devices"]} == {
        able: policy["body"],
        short: policy["body"],  # now it has the small model too
    }
    # Models that lack one the chain needs: no policy, rather than one the device refuses.
    assert set_models(api, able, PRIMARY)["fallback"] == {}
    # An admin's own fallback still wins.
    assert set_models(api, able, PRIMARY, fallback={"x": 1})["fallback"] == {"x": 1}
    # A device with no desired state at assignment gets the policy with its first one.
    late = enroll(api, clock, group="lab")["device_id"]
    again = api.post("/api/v1/policies/edge/assign", json={"group": "lab"}).json()
    assert [s["device"] for s in again["skipped"]] == [late]
    assert set_models(api, late, PRIMARY, SMALL)["fallback"] == policy["body"]
    assert stored(engine, late).fallback == policy["body"]


def test_unassign_falls_back_to_the_group_then_to_none(
    api: TestClient, lab: tuple[str, str], engine: Engine
) -> None:
    able, _ = lab
    group_policy = create(api, "theirs")
    create(api, "mine", breaker={"wait_in_open": 5})
    api.post("/api/v1/policies/theirs/assign", json={"group": "lab"})
    api.post("/api/v1/policies/mine/assign", json={"device": able})
    assert stored(engine, able).fallback["name"] == "mine"

    removed = api.delete(f"/api/v1/policies/assignments/device/{able}", headers=ANA)
    assert removed.status_code == 200, removed.text
    assert (removed.json()["policy"], removed.json()["updated"]) == ("mine", [able])
    assert stored(engine, able).fallback == group_policy["body"]

    assert api.delete("/api/v1/policies/assignments/group/lab").json()["updated"] == [able]
    assert stored(engine, able).fallback == {}
    status, _, message = error(api.delete("/api/v1/policies/assignments/group/lab"))
    assert status == 404
    assert "no policy is assigned" in message


def test_assign_refuses_unknown_targets_and_bad_requests(api: TestClient, clock: Clock) -> None:
    create(api)
    for body, status in (
        ({"group": "nowhere"}, 404),
        ({"device": "dev-nope"}, 404),
        ({"group": "lab", "version": 7}, 404),
        ({}, 422),
        ({"group": "a", "device": "b"}, 422),
    ):
        assert error(api.post("/api/v1/policies/edge/assign", json=body))[0] == status, body
    assert error(api.post("/api/v1/policies/nope/assign", json={"group": "x"}))[0] == 404


def test_every_action_is_audited_with_the_actor(api: TestClient, lab: tuple[str, str]) -> None:
    able, short = lab
    create(api)
    api.post("/api/v1/policies/edge/assign", json={"group": "lab"}, headers=ANA)
    api.delete("/api/v1/policies/assignments/group/lab", headers=ANA)
    audit = api.get("/api/v1/audit", params={"subject": "policy:edge"}).json()
    by_action = {a["action"]: a for a in audit}
    assert set(by_action) == {"policy.create", "policy.assign", "policy.unassign"}
    assert {a["actor"] for a in audit} == {"admin:ana"}
    assign = by_action["policy.assign"]["data"]
    assert (assign["version"], assign["scope"], assign["target"]) == (1, "group", "lab")
    assert assign["updated"] == [able]
    assert list(assign["ineligible"]) == [short]
