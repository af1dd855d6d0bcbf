"""Live updates: database changes become server-sent events for the pages that asked."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet.dashboard.events import parse_topics
from fleet.dashboard.live import Changes, read_changes, topics_of
from fleet.errors import InvalidInput
from fleet.tables import Device
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import Clock, enroll


def test_changes_name_each_thing_and_its_collection() -> None:
    changes = Changes(devices=frozenset({"d1"}), rollouts=frozenset({"r1"}), alerts=True)
    assert topics_of(changes) == {"devices", "device-d1", "rollouts", "rollout-r1", "alerts"}
    assert topics_of(Changes()) == set()


def test_topics_are_a_comma_separated_list() -> None:
    assert parse_topics("devices,, rollout-r1") == frozenset({"devices", "rollout-r1"})


@pytest.mark.parametrize("text", ["", ",", "device-", "everything", "device-a b", "devices;drop"])
def test_unknown_or_malformed_topics_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_topics(text)


def test_a_report_is_a_change_of_that_device(api: TestClient, engine: Engine, clock: Clock) -> None:
    device_id = enroll(api, clock)["device_id"]
    before = clock()
    assert device_id not in read_changes(engine, before).devices
    clock.advance(seconds=10)
    with engine.begin() as db:
        db.execute(
            sa.update(Device).where(Device.id == device_id).values(reported_at=clock())  # type: ignore[arg-type]
        )
    assert read_changes(engine, before).devices == {device_id}
    clock.advance(seconds=10)
    assert read_changes(engine, clock()).devices == frozenset()


def test_an_open_page_hears_about_a_report_of_its_device(
    api: TestClient, engine: Engine, clock: Clock, browser: Browser
) -> None:
    device_id = enroll(api, clock)["device_id"]
    other_id = enroll(api, clock)["device_id"]

    def report(device: str) -> None:
        with engine.begin() as db:
            db.execute(
                sa.update(Device).where(Device.id == device).values(reported_at=clock())  # type: ignore[arg-type]
            )

    clock.advance(seconds=10)
    heard: list[str] = []
    with browser.client.stream("GET", f"/ui/events?topics=device-{device_id}") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "retry: 2000"
        threading.Thread(target=lambda: (report(other_id), report(device_id))).start()
        for line in lines:
            if line.startswith("event: "):
                heard.append(line.removeprefix("event: "))
                break
    assert heard == [f"device-{device_id}"]  # not the other device's


def test_the_event_stream_needs_a_signed_in_viewer(api: TestClient, users: dict[str, str]) -> None:
    answer = TestClient(api.app).get("/ui/events?topics=devices", follow_redirects=False)
    assert answer.status_code == 401
