"""The fleet overview: devices by status, model versions, live rollouts and alerts, charts.

The counting queries are checked on a database of their own (no app loops running),
where a rollout's device states stay exactly as the engine left them; the page and
its fragments are checked through a signed-in browser on the app's own database.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.dashboard.views import fleet
from fleet.tables import Alert, Device, TelemetryRow
from models.policy import FailureKind
from models.wire import BreakerState, DegradedModel
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import Clock
from tests.fleet.rollout_world import GB, World, report

_CHART = re.compile(r"data-chart='([^']*)'")


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    """A fleet on a database of its own: nothing but the test moves its rollouts."""
    world = World.on(database_url)
    yield world
    world.db.dispose()


@pytest.fixture
def app_world(engine: Engine, clock: Clock) -> World:
    """A fleet written into the running app's database, on the app's clock."""
    return World(engine, clock=clock)


def degrade(world: World, device_id: str) -> None:
    """Its last report says the model's breaker is open: the fallbacks answer."""
    world._edit_report(
        device_id,
        degraded=[
            DegradedModel(
                name="gemma3",
                breaker=BreakerState.OPEN,
                kind=FailureKind.ERROR,
                reason="5 errors in a row",
                since=world.clock(),
            )
        ],
    )


def revoke(world: World, device_id: str) -> None:
    with Session(world.db) as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.revoked_at = world.clock()
        device.online = False
        session.add(device)
        session.commit()


def mixed_fleet(world: World) -> str:
    """Six devices of every kind (one revoked), and a live rollout of gemma3 2.0; its id.

    2.0 needs 6 GB of RAM: ``small`` (4 GB) is ineligible; the canary (``big``, the only
    other online device in the group) is updating after the first step.
    """
    world.artifact("1.0", ram_bytes=2 * GB)
    world.artifact("2.0", ram_bytes=6 * GB)
    world.device("big", hardware=report(ram_gb=16))
    world.device("small", hardware=report(ram_gb=4))
    world.device("sleepy", online=False, group=None)
    world.device("shaky", group=None)
    degrade(world, "shaky")
    world.device("gone", group=None)
    revoke(world, "gone")
    world.device("blank", serves=None, group=None)
    rollout = world.create(canary={"count": 1})
    world.step(rollout)
    return rollout


def test_status_counts_count_each_kind_of_device_once(world: World) -> None:
    rollout = mixed_fleet(world)
    assert world.states(rollout) == {"big": "updating", "small": "ineligible"}
    with Session(world.db) as session:
        counts = fleet.status_counts(session)
    assert counts == fleet.StatusCounts(
        enrolled=5,  # "gone" is revoked
        online=4,
        offline=1,
        updating=1,
        degraded=1,
        ineligible=1,
        revoked=1,
    )
    world.act(rollout, "abort")  # a finished rollout no longer counts anyone as updating
    with Session(world.db) as session:
        after = fleet.status_counts(session)
    assert (after.updating, after.ineligible) == (0, 0)


def test_fleet_models_reads_reported_versions_in_the_database(world: World) -> None:
    mixed_fleet(world)
    world.report("small", "2.0", "f" * 64)
    world.serve_also("big", "minilm")
    with Session(world.db) as session:
        models = fleet.fleet_models(session)
        only = fleet.fleet_models(session, "minilm")
    # "gone" is revoked and "blank" runs nothing: neither counts.
    assert models == [
        fleet.FleetModel("gemma3", "1.0", 3),
        fleet.FleetModel("gemma3", "2.0", 1),
        fleet.FleetModel("minilm", None, 1),
    ]
    assert only == [fleet.FleetModel("minilm", None, 1)]


def test_bucket_window_ends_with_the_bucket_holding_now() -> None:
    now = Clock().now
    window = fleet.bucket_window(now, hours=24, bucket_s=900)
    assert window.count == 96
    assert window.x[0] <= now.timestamp() - 24 * 3600 + 900
    assert window.x[-1] <= now.timestamp() < window.x[-1] + 900
    assert window.start.timestamp() == window.x[0]


def test_a_chart_leaves_gaps_where_no_sample_fell() -> None:
    window = fleet.BucketWindow(first=10, count=4, bucket_s=60)
    rows = {11: {"p95": 120.0}, 13: {"p95": None}}
    spec = fleet.chart("Latency", window, rows, [fleet.ChartLine("p95", fleet.reading("p95"))])
    assert spec["x"] == [600, 660, 720, 780]
    assert spec["series"] == [{"label": "p95", "values": [None, 120.0, None, None]}]
    assert fleet.has_points([spec])
    assert not fleet.has_points([fleet.chart("Empty", window, {}, [])])


# --- the page ---------------------------------------------------------------------------


def counts_shown(text: str) -> dict[str, int]:
    found = re.findall(
        r'data-count="(\w+)">\s*<div class="value[^"]*">([\d,]+)</div>', text, flags=re.S
    )
    return {key: int(value.replace(",", "")) for key, value in found}


def open_alert(world: World, message: str, severity: str = "error") -> None:
    now = world.clock()
    with Session(world.db) as session:
        session.add(
            Alert(
                kind="rollout_failed",
                subject="rollout:r-test",
                severity=severity,
                message=message,
                raised_at=now,
                updated_at=now,
            )
        )
        session.commit()


def test_the_overview_shows_counts_models_rollouts_and_alerts(
    browser: Browser, app_world: World
) -> None:
    rollout = mixed_fleet(app_world)
    open_alert(app_world, "rollout r-test failed its latency gate <b>twice</b>")
    page = browser.get("/ui/")
    assert page.status_code == 200, page.text
    counts = counts_shown(page.text)
    assert counts["online"] == 4
    assert counts["offline"] == 1
    assert counts["degraded"] == 1
    assert counts["ineligible"] == 1
    assert counts["enrolled"] == 5
    assert 'href="/ui/devices?status=degraded"' in page.text
    assert f'href="/ui/rollouts/{rollout}"' in page.text
    assert "gemma3 2.0" in page.text
    # The alert's message is text, never markup.
    assert "failed its latency gate &lt;b&gt;twice&lt;/b&gt;" in page.text
    assert 'href="/ui/alerts"' in page.text
    assert 'sse-connect="/ui/events?topics=devices,rollouts,alerts"' in page.text
    assert 'hx-get="/ui/overview/models" hx-trigger="load"' in page.text
    models = browser.get("/ui/overview/models").text
    assert '<a href="/ui/devices?model=gemma3%401.0">4</a>' in models
    assert '<a href="/ui/devices?model=gemma3%402.0">' not in models  # nobody runs 2.0 yet


def test_an_empty_fleet_says_so(browser: Browser) -> None:
    page = browser.get("/ui/")
    assert page.status_code == 200
    assert counts_shown(page.text)["enrolled"] == 0
    assert "No rollout is running" in page.text
    assert "No open alerts" in page.text
    assert "No device has reported a model yet" in browser.get("/ui/overview/models").text


@pytest.mark.parametrize(
    ("path", "element", "topic"),
    [
        ("/ui/overview/counts", 'id="overview-counts"', "sse:devices"),
        ("/ui/overview/rollouts", 'id="overview-rollouts"', "sse:rollouts"),
        ("/ui/overview/alerts", 'id="overview-alerts"', "sse:alerts"),
        ("/ui/overview/models", 'id="overview-models"', "sse:devices"),
    ],
)
def test_each_panel_refreshes_alone_on_its_topic(
    browser: Browser, app_world: World, path: str, element: str, topic: str
) -> None:
    app_world.device("one")
    fragment = browser.get(path)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    assert fragment.text.lstrip().startswith(("<div " + element, "<article " + element))
    assert f'hx-trigger="{topic} throttle:' in fragment.text


def telemetry(world: World, device_id: str, at: Any, **values: Any) -> None:
    with Session(world.db) as session:
        session.add(
            TelemetryRow(
                device_id=device_id,
                sample_id=uuid.uuid4().hex,
                seq=0,
                ts=at,
                window_s=10.0,
                rejections=0,
                sent_at=at,
                stored_at=at,
                **values,
            )
        )
        session.commit()


def charts_of(text: str) -> dict[str, dict[str, Any]]:
    specs = [json.loads(html.unescape(raw)) for raw in _CHART.findall(text)]
    return {spec["title"]: spec for spec in specs}


def test_fleet_charts_bucket_the_last_day_in_sql(browser: Browser, app_world: World) -> None:
    app_world.device("dev-a")
    app_world.device("dev-b")
    now = app_world.clock()
    window = fleet.bucket_window(now, 24, 900)
    last = window.start + timedelta(seconds=900 * (window.count - 1))
    sample = {"requests": 100, "tokens_per_s": 20.0}
    a = {"latency_p50_ms": 100.0, "latency_p95_ms": 200.0, "errors": 5}
    b = {"latency_p50_ms": 300.0, "latency_p95_ms": 400.0, "errors": 0}
    telemetry(app_world, "dev-a", last, **a, **sample)
    telemetry(app_world, "dev-b", last, **b, **sample)
    old = now - timedelta(hours=30)  # outside the window: never drawn
    telemetry(app_world, "dev-a", old, latency_p50_ms=9999.0, errors=100, requests=100)
    answer = browser.get("/ui/overview/charts")
    assert answer.status_code == 200
    charts = charts_of(answer.text)
    latency = charts["Latency (ms, mean of devices)"]
    assert len(latency["x"]) == 96
    p50, p95, worst = (s["values"] for s in latency["series"])
    assert (p50[-1], p95[-1], worst[-1]) == (200.0, 300.0, 400.0)
    assert p50[:-1] == [None] * 95
    errors = charts["Errors (% of requests)"]["series"][0]["values"]
    assert errors[-1] == 2.5  # 5 errors in 200 requests
    requests, tokens = (s["values"] for s in charts["Throughput"]["series"])
    assert requests[-1] == round(200 / 900, 3)
    assert tokens[-1] == round(2 * 20.0 * 10 / 900, 3)  # tokens generated, per second


def p50_at(browser: Browser, at: Any) -> float | None:
    latency = charts_of(browser.get("/ui/overview/charts").text)["Latency (ms, mean of devices)"]
    value: float | None = latency["series"][0]["values"][latency["x"].index(int(at.timestamp()))]
    return value


def test_settled_buckets_are_read_once_then_kept_a_while(
    browser: Browser, app_world: World, clock: Clock
) -> None:
    app_world.device("dev-a")
    window = fleet.bucket_window(clock.now, 24, 900)
    old = window.start + timedelta(seconds=900 * 10)  # ended hours ago: settled
    telemetry(app_world, "dev-a", old, latency_p50_ms=100.0, requests=10, errors=0)
    assert p50_at(browser, old) == 100.0
    telemetry(app_world, "dev-a", old, latency_p50_ms=300.0, requests=10, errors=0)  # late
    telemetry(app_world, "dev-a", clock.now, latency_p50_ms=50.0, requests=10, errors=0)
    assert p50_at(browser, old) == 100.0  # the settled bucket as first read
    last = window.start + timedelta(seconds=900 * (window.count - 1))
    assert p50_at(browser, last) == 50.0  # recent buckets are read every time
    clock.advance(minutes=16)  # past the copy's 15 minutes: every bucket is read again
    assert p50_at(browser, old) == 200.0


def test_a_copy_of_settled_buckets_serves_one_width_for_a_while() -> None:
    settled = fleet.SettledBuckets(settle_s=3600, ttl_s=900)
    now = Clock().now
    until = settled.settled_until(now, 900)
    assert (until + 1) * 900 + 3600 > now.timestamp() >= until * 900 + 3600
    assert settled.get(now, 900) is None
    settled.put(now, 900, until, {until - 1: {"p50": 1.0}, until: {"p50": 2.0}})
    assert settled.get(now + timedelta(seconds=900), 900) == (until, {until - 1: {"p50": 1.0}})
    assert settled.get(now + timedelta(seconds=901), 900) is None  # stale
    assert settled.get(now, 300) is None  # another bucket width
    assert settled.get(now - timedelta(seconds=1), 900) is None  # a clock that went back


def test_the_overview_needs_someone_signed_in(api: TestClient, users: dict[str, str]) -> None:
    anonymous = TestClient(api.app)
    for path in ("/ui/", "/ui/overview/counts", "/ui/overview/charts"):
        answer = anonymous.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login")


def test_a_viewer_sees_the_overview(browser_as: Any, app_world: World) -> None:
    app_world.device("one")
    vera = browser_as("vera")
    page = vera.get("/ui/")
    assert page.status_code == 200
    assert counts_shown(page.text)["online"] == 1
