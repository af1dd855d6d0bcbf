"""Desired state: stored and versioned first, then published; groups fan out."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.desired import RENEW_BEFORE
from fleet.tables import Device, ModelArtifact
from models.wire import DESIRED_LIFETIME, DesiredState
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import Clock, create_group, enroll, error

GB = 2**30
BODY = {
    "models": [{"name": "gemma3-270m", "version": "1.0.0"}, {"name": "minilm"}],
    "config": {"max_queue": 16},
    "fallback": {"on_failure": "minilm"},
}


def test_put_stores_bumps_the_version_and_publishes(
    api: TestClient, clock: Clock, link: FakeLink, engine: Engine
) -> None:
    device_id = enroll(api, clock)["device_id"]

    first = api.put(f"/api/v1/devices/{device_id}/desired", json=BODY)
    second = api.put(f"/api/v1/devices/{device_id}/desired", json={"models": []})

    assert first.status_code == second.status_code == 202
    assert first.json()["version"] == 1
    assert second.json()["version"] == 2
    assert first.json()["published"] is True
    assert [s.version for s in link.published] == [1, 2]
    state = link.published[0]
    assert state.device_id == device_id
    assert state.issued_at == clock.now
    assert [(m.name, m.version) for m in state.models] == [
        ("gemma3-270m", "1.0.0"),
        ("minilm", None),
    ]
    assert state.config == {"max_queue": 16}
    assert state.fallback == {"on_failure": "minilm"}
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        assert device.desired_version == 2
        assert DesiredState.model_validate(device.desired) == link.published[1]
    got = api.get(f"/api/v1/devices/{device_id}/desired").json()
    assert got["version"] == 2
    assert got["models"] == []


def test_broker_down_still_stores_and_says_not_published(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    link.broker_down = True
    response = api.put(f"/api/v1/devices/{device_id}/desired", json=BODY)
    assert response.status_code == 202, response.text
    assert response.json()["published"] is False
    assert response.json()["version"] == 1
    assert link.published == []
    assert api.get(f"/api/v1/devices/{device_id}").json()["desired_version"] == 1


def test_get_desired_before_any_is_404(api: TestClient, clock: Clock) -> None:
    device_id = enroll(api, clock)["device_id"]
    status, _, message = error(api.get(f"/api/v1/devices/{device_id}/desired"))
    assert status == 404
    assert "no desired state" in message


def test_put_rejects_bad_bodies(api: TestClient, clock: Clock, link: FakeLink) -> None:
    device_id = enroll(api, clock)["device_id"]
    url = f"/api/v1/devices/{device_id}/desired"
    twice = {"models": [{"name": "a"}, {"name": "a", "version": "2"}]}
    status, _, message = error(api.put(url, json=twice))
    assert status == 422
    assert "more than once" in message
    assert error(api.put(url, json={"models": [{"name": "no/slash"}]}))[0] == 422
    assert error(api.put(url, json={"models": [], "extra": 1}))[0] == 422
    assert link.published == []
    assert api.get(f"/api/v1/devices/{device_id}").json()["desired_version"] == 0


@pytest.mark.parametrize("name", ["Gemma", "..", ".hidden", "-x", "a" * 65, "gemma 3"])
def test_put_refuses_a_model_name_no_device_can_store(
    api: TestClient, clock: Clock, link: FakeLink, name: str
) -> None:
    """The controller must never sign a desired state the agent's store would refuse."""
    device_id = enroll(api, clock)["device_id"]
    url = f"/api/v1/devices/{device_id}/desired"
    status, _, message = error(api.put(url, json={"models": [{"name": name}]}))
    assert status == 422
    assert "name" in message
    assert link.published == []


def test_put_for_unknown_or_revoked_device(api: TestClient, clock: Clock, link: FakeLink) -> None:
    assert error(api.put("/api/v1/devices/dev-0000000000000000/desired", json=BODY))[0] == 404
    device_id = enroll(api, clock)["device_id"]
    api.post(f"/api/v1/devices/{device_id}/revoke")
    assert error(api.put(f"/api/v1/devices/{device_id}/desired", json=BODY))[:2] == (
        409,
        "conflict",
    )
    assert link.published == []


def test_concurrent_puts_get_distinct_versions_published_in_order(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    url = f"/api/v1/devices/{device_id}/desired"
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: api.put(url, json=BODY), range(8)))
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 9))
    assert [s.version for s in link.published] == list(range(1, 9))


def test_group_desired_fans_out_to_live_members(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    create_group(api, "lab")
    create_group(api, "other")
    members = sorted(enroll(api, clock, group="lab")["device_id"] for _ in range(3))
    outsider = enroll(api, clock, group="other")["device_id"]
    api.put(f"/api/v1/devices/{members[0]}/desired", json={"models": []})  # now at version 1
    api.post(f"/api/v1/devices/{members[2]}/revoke")
    link.published.clear()

    response = api.put("/api/v1/groups/lab/desired", json=BODY)

    assert response.status_code == 202, response.text
    result = response.json()
    assert result["group"] == "lab"
    assert [(d["device_id"], d["version"]) for d in result["devices"]] == [
        (members[0], 2),
        (members[1], 1),
    ]
    assert {s.device_id for s in link.published} == {members[0], members[1]}
    assert api.get(f"/api/v1/devices/{outsider}").json()["desired_version"] == 0
    assert api.get(f"/api/v1/devices/{members[2]}").json()["desired_version"] == 0


def test_group_desired_unknown_group_is_404(api: TestClient) -> None:
    assert error(api.put("/api/v1/groups/nope/desired", json=BODY))[0] == 404


def test_group_desired_with_broker_down(api: TestClient, clock: Clock, link: FakeLink) -> None:
    create_group(api, "lab")
    enroll(api, clock, group="lab")
    link.broker_down = True
    result = api.put("/api/v1/groups/lab/desired", json=BODY).json()
    assert [d["published"] for d in result["devices"]] == [False]


def test_desired_states_are_reissued_before_they_expire(
    api: TestClient, clock: Clock, link: FakeLink
) -> None:
    device_id = enroll(api, clock)["device_id"]
    api.put(f"/api/v1/devices/{device_id}/desired", json=BODY)
    state = api.app.state.fleet  # type: ignore[attr-defined]
    issued = link.published[-1]
    assert issued.expires == clock.now + DESIRED_LIFETIME

    assert asyncio.run(state.desired.renew()) == 0  # fresh: nothing to do
    clock.now = issued.expires - RENEW_BEFORE - timedelta(seconds=1)
    assert asyncio.run(state.desired.renew()) == 0
    clock.now = issued.expires - RENEW_BEFORE + timedelta(seconds=1)
    assert asyncio.run(state.desired.renew()) == 1
    renewed = link.published[-1]
    assert renewed.version == issued.version + 1
    assert renewed.expires == clock.now + DESIRED_LIFETIME
    assert (renewed.models, renewed.config, renewed.fallback) == (
        issued.models,
        issued.config,
        issued.fallback,
    )
    assert asyncio.run(state.desired.renew()) == 0  # renewed once, not again


def test_a_version_with_several_variants_goes_to_each_device_as_its_best_fit(
    api: TestClient, clock: Clock, engine: Engine, link: FakeLink
) -> None:
    """No variant named: an 8 GB device gets Q8_0, a 2 GB one Q4_K_M (docs/variants.md)."""
    create_group(api, "lab")
    big, small = (enroll(api, clock, group="lab")["device_id"] for _ in range(2))
    with Session(engine) as session:
        device = session.get(Device, small)
        assert device is not None
        device.device_report = {**device.device_report, "ram_total_bytes": 2 * GB}
        session.add(device)
        for variant, ram in (("Q4_K_M", 1 * GB), ("Q8_0", 4 * GB)):
            session.add(
                ModelArtifact(
                    name="gemma3",
                    version="2.0",
                    variant=variant,
                    format="gguf",
                    sha256=hashlib.sha256(variant.encode()).hexdigest(),
                    size_bytes=100,
                    meta={"quantization": variant, "ram_bytes": ram},
                )
            )
        session.commit()
    response = api.put(
        "/api/v1/groups/lab/desired", json={"models": [{"name": "gemma3", "version": "2.0"}]}
    )
    assert response.status_code == 202, response.text
    paths = {s.device_id: s.models[0].target.path for s in link.published if s.models[0].target}
    assert paths == {big: "gemma3/2.0/Q8_0.gguf", small: "gemma3/2.0/Q4_K_M.gguf"}
    # A device too small for every variant is told why, and nothing is stored for it.
    with Session(engine) as session:
        device = session.get(Device, small)
        assert device is not None
        device.device_report = {**device.device_report, "ram_total_bytes": GB // 2}
        session.add(device)
        session.commit()
    refused = api.put(
        f"/api/v1/devices/{small}/desired", json={"models": [{"name": "gemma3", "version": "2.0"}]}
    )
    status, _, message = error(refused)
    assert status == 409
    assert "no variant fits" in message
