"""One device's page: capabilities, desired against reported with the drift marked, slots,
degraded mode, telemetry charts, the events timeline, live panels, and its actions with
the roles, CSRF checks, confirmations and audit entries they need.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.dashboard.views.devices import bucket_for, state_rows
from fleet.state import compute_drift
from fleet.tables import (
    AuditEntry,
    Device,
    DeviceTag,
    EventRow,
    Group,
    PolicyRow,
    TelemetryRow,
)
from models.wire import DesiredModel, DesiredState, EventKind, TargetRef
from tests.fakes.fleet_link import FakeLink
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.dashboard.test_overview import degrade
from tests.fleet.helpers import Clock
from tests.fleet.rollout_world import GB, MODEL, World, report, sha

DEVICE = "edge-cam"
_CHART = re.compile(r"data-chart='([^']*)'")


@pytest.fixture
def world(engine: Engine, clock: Clock) -> World:
    """A GPU box that runs gemma3 1.0 while 2.0 is desired, with a policy it lags behind."""
    world = World(engine, clock=clock)
    world.artifact("1.0")
    world.artifact("2.0")
    world.device(DEVICE, hardware=report(ram_gb=16, gpu_gb=8))
    world.serve_also(DEVICE, "minilm")
    old = world.policy("edge-default", 1)
    world.policy("edge-default", 2, chains={})
    world.report_policy(DEVICE, old)
    with Session(world.db) as session:
        device = session.get(Device, DEVICE)
        assert device is not None
        latest = session.exec(
            select(PolicyRow).where(col(PolicyRow.name) == "edge-default", PolicyRow.version == 2)
        ).one()
        desired = DesiredState(
            device_id=DEVICE,
            version=3,
            issued_at=world.clock(),
            expires=world.clock() + timedelta(days=30),
            models=[
                DesiredModel(
                    name=MODEL,
                    version="2.0",
                    target=TargetRef(
                        path=f"{MODEL}/2.0/Q4_K_M.gguf", length=1000, sha256=sha("2.0/Q4_K_M")
                    ),
                )
            ],
            fallback=latest.body,
        )
        device.desired = desired.model_dump(mode="json")
        device.desired_version = 3
        device.reported = {**(device.reported or {}), "desired_version": 2}
        session.add(device)
        session.commit()
    degrade(world, DEVICE)
    return world


def event(world: World, kind: EventKind, at_s: int, severity: str = "info", **data: Any) -> None:
    ts = world.clock() - timedelta(seconds=at_s)
    with Session(world.db) as session:
        session.add(
            EventRow(
                device_id=DEVICE,
                event_id=uuid.uuid4().hex,
                ts=ts,
                kind=kind.value,
                severity=severity,
                message=f"{kind.value} {at_s} s ago",
                data=data,
                stored_at=ts,
            )
        )
        session.commit()


def audit(world: World, action: str) -> list[AuditEntry]:
    with Session(world.db) as session:
        return list(
            session.exec(
                select(AuditEntry)
                .where(col(AuditEntry.action) == action)
                .order_by(col(AuditEntry.id))
            ).all()
        )


def device_row(world: World) -> Device:
    with Session(world.db) as session:
        device = session.get(Device, DEVICE)
        assert device is not None
        return device


def tags(world: World) -> list[str]:
    with Session(world.db) as session:
        return sorted(
            session.exec(select(DeviceTag.tag).where(col(DeviceTag.device_id) == DEVICE)).all()
        )


def section(text: str, element_id: str) -> str:
    """The HTML of the element with this id, up to the next top-level panel."""
    start = text.index(f'id="{element_id}"')
    end = text.find("</article>", start)
    return text[start : end if end > 0 else None]


# --- what the page shows ------------------------------------------------------------------


def test_the_page_compares_desired_with_reported_and_marks_the_drift(
    browser: Browser, world: World
) -> None:
    event(world, EventKind.UPDATE_INSTALLED, 300, model=MODEL, version="2.0")
    event(world, EventKind.UPDATE_ROLLED_BACK, 200, "error", model=MODEL, version="2.0")
    page = browser.get(f"/ui/devices/{DEVICE}")
    assert page.status_code == 200, page.text
    state = section(page.text, "device-state")
    assert "the device runs desired version 2, 3 is the latest" in state
    gemma = re.search(rf'<tr class="drift" data-model="{MODEL}">(.*?)</tr>', state, re.S)
    assert gemma is not None, state
    assert "gemma3 runs version 1.0, 2.0 is desired" in gemma.group(1)
    assert "2.0 <small>Q4_K_M</small>" in gemma.group(1)  # desired, variant from the target
    assert "1.0 <small>Q4_K_M</small>" in gemma.group(1)  # reported, variant by its sha256
    assert "rolled back</span> 2.0" in gemma.group(1)  # the latest update event wins
    minilm = re.search(r'<tr class="drift" data-model="minilm">(.*?)</tr>', state, re.S)
    assert minilm is not None
    assert "minilm runs but is not desired" in minilm.group(1)
    policy = re.search(r'<tr class="drift" id="policy-row">(.*?)</tr>', state, re.S)
    assert policy is not None
    assert "desired: edge-default v2" in policy.group(1)
    assert 'enforced: <a href="/ui/policies/edge-default">edge-default v1</a>' in policy.group(1)
    assert ">open</span>" in state  # the breaker
    assert "5 errors in a row" in state


def test_the_summary_shows_status_and_versions(browser: Browser, world: World) -> None:
    page = browser.get(f"/ui/devices/{DEVICE}")
    summary = page.text[
        page.text.index('id="device-summary"') : page.text.index('id="device-state"')
    ]
    assert 'data-status="online"' in summary
    assert "degraded: gemma3" in summary
    assert ">drift</span>" in summary
    assert "v3" in summary
    assert "(applied v2)" in summary


def test_capabilities_come_from_the_hardware_report(browser: Browser, world: World) -> None:
    caps = section(browser.get(f"/ui/devices/{DEVICE}").text, "device-capabilities")
    assert "16.0 GiB total" in caps
    assert "RTX: 8.0 GiB, compute 8.6" in caps
    assert "Linux (x86_64, kernel 6.8)" in caps


def test_state_rows_put_desired_models_first_and_keep_undesired_ones() -> None:
    desired = DesiredState(device_id=DEVICE, version=1, models=[DesiredModel(name="b")])
    rows = state_rows(desired, None, compute_drift(desired, None), {}, {})
    assert [(r.model, r.state, r.drifted) for r in rows] == [("b", None, False)]
    assert rows[0].desired_version is None


def charts(text: str) -> dict[str, dict[str, Any]]:
    found = [json.loads(html.unescape(raw)) for raw in _CHART.findall(text)]
    return {c["title"]: c for c in found}


def sample(world: World, ago_s: int, **values: Any) -> None:
    ts = world.clock() - timedelta(seconds=ago_s)
    with Session(world.db) as session:
        session.add(
            TelemetryRow(
                device_id=DEVICE,
                sample_id=uuid.uuid4().hex,
                seq=ago_s,
                ts=ts,
                window_s=10.0,
                requests=10,
                errors=values.pop("errors", 0),
                rejections=0,
                sent_at=ts,
                stored_at=ts,
                **values,
            )
        )
        session.commit()


def test_telemetry_charts_bucket_the_window_asked_for(browser: Browser, world: World) -> None:
    bucket_s = bucket_for(24)
    now_bucket = int(world.clock().timestamp()) // bucket_s
    ago = int(world.clock().timestamp()) - now_bucket * bucket_s  # into the current bucket
    gpu = {"gpu_memory_used_bytes": 3 * GB, "latency_p50_ms": 40.0, "latency_p95_ms": 90.0}
    sample(world, ago, gpu_temperature_c=61.0, errors=2, tokens_per_s=30.0, **gpu)
    sample(world, 0, gpu_temperature_c=70.0, errors=1, tokens_per_s=50.0, **gpu)
    sample(world, 10 * 3600, gpu_temperature_c=99.0)  # inside 24 h, outside 6 h
    day = charts(browser.get(f"/ui/devices/{DEVICE}").text)
    assert set(day) == {
        "Latency (ms)",
        "Tokens/s",
        "Errors (per bucket)",
        "GPU memory (GiB)",
        "GPU temperature (°C)",
    }
    assert len(day["Tokens/s"]["x"]) == 24 * 3600 // bucket_s
    assert day["GPU memory (GiB)"]["series"][0]["values"][-1] == 3.0
    assert day["GPU temperature (°C)"]["series"][0]["values"][-1] == 70.0  # the hottest
    assert day["Tokens/s"]["series"][0]["values"][-1] == 40.0  # the mean
    assert day["Errors (per bucket)"]["series"][0]["values"][-1] == 3
    assert 99.0 in day["GPU temperature (°C)"]["series"][0]["values"]
    six = browser.get(f"/ui/devices/{DEVICE}/telemetry?hours=6")
    assert six.text.lstrip().startswith('<article id="device-telemetry"')
    temperatures = charts(six.text)["GPU temperature (°C)"]["series"][0]["values"]
    assert 99.0 not in temperatures
    assert len(temperatures) == 6 * 3600 // bucket_for(6)


@pytest.mark.parametrize("hours", ["0", "169", "a day", "-1"])
def test_a_window_outside_a_week_is_refused(browser: Browser, world: World, hours: str) -> None:
    for path in (
        f"/ui/devices/{DEVICE}?hours={hours}",
        f"/ui/devices/{DEVICE}/telemetry?hours={hours}",
    ):
        answer = browser.get(path)
        assert answer.status_code == 422, path
        assert "hours must be a whole number from 1 to 168" in answer.text


def test_no_telemetry_says_so(browser: Browser, world: World) -> None:
    page = browser.get(f"/ui/devices/{DEVICE}")
    assert "No telemetry from this device in the last 24 hours" in page.text
    assert "data-chart" not in page.text


def test_events_are_newest_first_and_paged(browser: Browser, world: World) -> None:
    for i in range(30):
        event(world, EventKind.BREAKER_OPENED if i % 2 else EventKind.ONLINE, at_s=i * 60)
    first = browser.get(f"/ui/devices/{DEVICE}")
    messages = re.findall(r"<td>(\w+ \d+ s ago)</td>", section(first.text, "device-events"))
    assert messages[:2] == ["online 0 s ago", "breaker_opened 60 s ago"]
    assert len(messages) == 25
    older = f"/ui/devices/{DEVICE}/events?page=2"
    assert f'hx-get="{older}"' in first.text
    second = browser.get(older)
    assert second.text.lstrip().startswith('<div id="device-events">')
    assert re.findall(r"<td>(\w+ \d+ s ago)</td>", second.text) == [
        f"{'breaker_opened' if i % 2 else 'online'} {i * 60} s ago" for i in range(25, 30)
    ]
    assert "Older" not in second.text
    assert "Newer" in second.text


def test_the_live_panels_listen_for_the_device_and_refresh_alone(
    browser: Browser, world: World
) -> None:
    page = browser.get(f"/ui/devices/{DEVICE}")
    assert f'sse-connect="/ui/events?topics=device-{DEVICE}"' in page.text
    for panel in ("summary", "state"):
        trigger = (
            f'hx-get="/ui/devices/{DEVICE}/{panel}" hx-trigger="sse:device-{DEVICE} throttle:1s"'
        )
        assert trigger in page.text
    world.report(DEVICE, "2.0", sha("2.0/Q4_K_M"))  # a new report arrives
    state = browser.get(f"/ui/devices/{DEVICE}/state")
    assert state.text.lstrip().startswith('<article id="device-state"')
    assert f'<tr class="" data-model="{MODEL}">' in state.text  # no drift left for gemma3
    summary = browser.get(f"/ui/devices/{DEVICE}/summary")
    assert summary.text.lstrip().startswith('<div id="device-summary"')


def test_an_unknown_device_is_a_404_page(browser: Browser) -> None:
    for path in ("/ui/devices/nope-404", "/ui/devices/nope-404/state"):
        answer = browser.get(path)
        assert answer.status_code == 404
        assert "no device 'nope-404'" in html.unescape(answer.text)


# --- actions: who sees them, who may use them ---------------------------------------------


def test_each_role_sees_the_actions_it_may_use(browser_as: Any, world: World) -> None:
    edit, revoke = f'action="/ui/devices/{DEVICE}/edit"', f'action="/ui/devices/{DEVICE}/revoke"'
    vera = browser_as("vera").get(f"/ui/devices/{DEVICE}").text
    assert edit not in vera
    assert revoke not in vera
    assert "You can look, not change" in vera
    oscar = browser_as("oscar").get(f"/ui/devices/{DEVICE}").text
    assert edit in oscar
    assert revoke not in oscar
    assert f'action="/ui/devices/{DEVICE}/command"' in oscar
    ada = browser_as("ada").get(f"/ui/devices/{DEVICE}").text
    assert edit in ada
    assert revoke in ada
    assert 'name="confirm" value="yes" required' in ada


def test_an_operator_edits_name_group_and_tags_and_it_is_audited(
    browser_as: Any, world: World
) -> None:
    with Session(world.db) as session:
        session.add(Group(name="yard"))
        session.commit()
    oscar = browser_as("oscar")
    answer = oscar.post_form(
        f"/ui/devices/{DEVICE}/edit", {"name": "Yard cam", "group": "yard", "tags": "b, a  a"}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"/ui/devices/{DEVICE}?done=saved"
    device = device_row(world)
    assert (device.name, device.group) == ("Yard cam", "yard")
    assert tags(world) == ["a", "b"]
    (entry,) = audit(world, "device.update")
    assert (entry.actor, entry.subject) == ("oscar", f"device:{DEVICE}")
    assert entry.data == {"name": "Yard cam", "group": "yard", "tags": ["a", "b"]}
    assert "(session)" in entry.source
    assert "Saved." in oscar.get(answer.headers["location"]).text


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"name": "x", "group": "nowhere", "tags": ""}, "no group 'nowhere'"),
        ({"name": "x", "group": "", "tags": "ok -not-a-tag"}, "tags"),
        ({"name": "", "group": "", "tags": ""}, "name"),
    ],
)
def test_bad_edits_give_the_form_back_with_the_error_and_change_nothing(
    browser: Browser, world: World, form: dict[str, str], message: str
) -> None:
    answer = browser.post_form(f"/ui/devices/{DEVICE}/edit", form)
    assert answer.status_code == 422
    error = re.search(r'<p class="error" role="alert" id="edit-error">([^<]*)</p>', answer.text)
    assert error is not None, answer.text
    assert message in html.unescape(error.group(1))
    assert f'value="{form["tags"]}"' in answer.text  # what was typed stays in the form
    assert device_row(world).name == DEVICE
    assert device_row(world).group == "lab"
    assert audit(world, "device.update") == []


def test_a_viewer_cannot_edit_and_a_post_without_csrf_is_refused(
    browser_as: Any, world: World
) -> None:
    vera = browser_as("vera")
    answer = vera.post_form(f"/ui/devices/{DEVICE}/edit", {"name": "mine", "group": "", "tags": ""})
    assert answer.status_code == 403
    oscar = browser_as("oscar")
    forged = oscar.client.post(
        f"/ui/devices/{DEVICE}/edit",
        data={"name": "forged", "group": "", "tags": ""},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    assert "CSRF" in forged.text
    assert device_row(world).name == DEVICE
    assert audit(world, "device.update") == []


def test_revoking_needs_an_admin_and_a_ticked_confirmation(
    browser_as: Any, world: World, link: FakeLink
) -> None:
    path = f"/ui/devices/{DEVICE}/revoke"
    assert browser_as("oscar").post_form(path, {"confirm": "yes"}).status_code == 403
    ada = browser_as("ada")
    unconfirmed = ada.post_form(path, {})
    assert unconfirmed.status_code == 400
    assert "tick the box to confirm" in unconfirmed.text
    assert device_row(world).revoked_at is None
    assert audit(world, "device.revoke") == []
    done = ada.post_form(path, {"confirm": "yes"})
    assert done.status_code == 303
    assert device_row(world).revoked_at is not None
    (entry,) = audit(world, "device.revoke")
    assert entry.actor == "ada"
    assert DEVICE in link.cleared
    page = ada.get(done.headers["location"]).text
    assert 'data-status="revoked"' in page
    assert f'action="/ui/devices/{DEVICE}/revoke"' not in page
    assert f'action="/ui/devices/{DEVICE}/command"' not in page


def test_an_operator_sends_a_command(browser_as: Any, world: World, link: FakeLink) -> None:
    oscar = browser_as("oscar")
    answer = oscar.post_form(f"/ui/devices/{DEVICE}/command", {"kind": "reconcile"})
    assert answer.status_code == 303
    assert [(c.device_id, c.kind.value) for c in link.commands] == [(DEVICE, "reconcile")]
    (entry,) = audit(world, "device.command")
    assert (entry.actor, entry.data) == ("oscar", {"kind": "reconcile"})
    wrong = oscar.post_form(f"/ui/devices/{DEVICE}/command", {"kind": "reboot"})
    assert wrong.status_code == 422
    assert "choose a command" in wrong.text
    assert (
        browser_as("vera")
        .post_form(f"/ui/devices/{DEVICE}/command", {"kind": "report"})
        .status_code
        == 403
    )
    assert len(link.commands) == 1


def test_a_command_the_broker_cannot_take_is_reported_on_the_page(
    browser: Browser, world: World, link: FakeLink
) -> None:
    link.broker_down = True
    answer = browser.post_form(f"/ui/devices/{DEVICE}/command", {"kind": "report"})
    assert answer.status_code == 503
    assert 'id="action-error"' in answer.text
    assert "fake broker is down" in answer.text
    assert audit(world, "device.command") == []
