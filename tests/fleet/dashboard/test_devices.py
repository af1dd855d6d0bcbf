"""The device list: search, filters, sort and pages in the URL, htmx table swaps, 10,000 rows.

Devices are rows written into the running app's database, as the ingest would; the
list is read through a signed-in browser, so the page, its parameters and its SQL
are checked together, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.dashboard.views.devices import Listing, parse_listing
from fleet.errors import InvalidInput
from fleet.tables import Device, DeviceTag, Group
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.dashboard.test_overview import degrade, revoke
from tests.fleet.helpers import Clock
from tests.fleet.rollout_world import World, sha

_DEVICE_LINK = re.compile(r'<a href="/ui/devices/([a-z0-9-]+)" class="device-link">')


@pytest.fixture
def world(engine: Engine, clock: Clock) -> World:
    return World(engine, clock=clock)


def shown(page: Any) -> list[str]:
    """The device ids the list shows, in order."""
    assert page.status_code == 200, page.text
    return _DEVICE_LINK.findall(page.text)


def total(page: Any) -> int:
    found = re.search(r'data-total="(\d+)"', page.text)
    assert found is not None, page.text
    return int(found.group(1))


def tag(world: World, device_id: str, *tags: str) -> None:
    with Session(world.db) as session:
        for name in tags:
            session.add(DeviceTag(device_id=device_id, tag=name))
        session.commit()


def rename(world: World, device_id: str, name: str, **fields: Any) -> None:
    with Session(world.db) as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.name = name
        for key, value in fields.items():
            setattr(device, key, value)
        session.add(device)
        session.commit()


# --- the listing's parameters (pure) -----------------------------------------------------


def test_a_listing_is_its_query_string() -> None:
    listing = parse_listing({"q": " cam ", "status": "online", "model": "gemma3@2.0", "page": "3"})
    assert listing == Listing(q="cam", status="online", model="gemma3@2.0", page=3)
    assert (listing.model_name, listing.model_version) == ("gemma3", "2.0")
    assert parse_listing({}) == Listing()
    assert Listing().url() == "/ui/devices"
    assert listing.url(page=1) == "/ui/devices?q=cam&status=online&model=gemma3%402.0"
    assert Listing().sorted_by("name") == "/ui/devices?order=desc"
    assert Listing(sort="name", order="desc").sorted_by("name") == "/ui/devices"
    assert Listing(page=4).sorted_by("last_seen") == "/ui/devices?sort=last_seen"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "sleeping"}, "status"),
        ({"sort": "password"}, "sort"),
        ({"order": "sideways"}, "order"),
        ({"page": "0"}, "page"),
        ({"page": "two"}, "page"),
        ({"per_page": "1000"}, "per_page"),
        ({"model": "Not A Model"}, "model"),
        ({"model": "gemma3@bad version"}, "model"),
        ({"q": "x" * 129}, "q"),
    ],
)
def test_a_bad_parameter_is_refused_by_name(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_listing(params)
    assert caught.value.field == field


# --- search and filters -------------------------------------------------------------------


@pytest.fixture
def fleet(world: World) -> World:
    """Five devices: names, groups, tags, models and states to filter by."""
    with Session(world.db) as session:
        session.add(Group(name="yard"))
        session.commit()
    world.device("cam-001")
    rename(world, "cam-001", "Front gate camera")
    tag(world, "cam-001", "outdoor", "camera")
    world.device("cam-002", group="yard")
    rename(world, "cam-002", "Back yard camera")
    tag(world, "cam-002", "outdoor")
    world.report("cam-002", "2.0", sha("2.0/Q4_K_M"))
    world.device("kiosk-01", online=False)
    rename(world, "kiosk-01", "Lobby kiosk 100%")
    world.device("kiosk-02", group=None)
    degrade(world, "kiosk-02")
    world.serve_also("kiosk-02", "minilm")
    world.device("old-box", serves=None, group=None)
    revoke(world, "old-box")
    return world


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["cam-002", "cam-001", "kiosk-02", "kiosk-01", "old-box"]),  # by name, any case
        ("q=camera", ["cam-002", "cam-001"]),  # part of the name, any case
        ("q=CAM-00", ["cam-002", "cam-001"]),  # part of the id
        ("q=100%25", ["kiosk-01"]),  # % is a character, not a wildcard
        ("q=k%25k", []),  # as a wildcard it would match every kiosk
        ("group=yard", ["cam-002"]),
        ("tag=outdoor", ["cam-002", "cam-001"]),
        ("tag=camera&group=lab", ["cam-001"]),
        ("status=online", ["cam-002", "cam-001", "kiosk-02"]),
        ("status=offline", ["kiosk-01"]),
        ("status=revoked", ["old-box"]),
        ("status=degraded", ["kiosk-02"]),
        ("model=gemma3", ["cam-002", "cam-001", "kiosk-02", "kiosk-01"]),
        ("model=gemma3%401.0", ["cam-001", "kiosk-02", "kiosk-01"]),
        ("model=gemma3@2.0", ["cam-002"]),
        ("model=minilm", ["kiosk-02"]),
        ("model=gemma3@9.9", []),
    ],
)
def test_search_and_filters_pick_the_devices(
    browser: Browser, fleet: World, query: str, expected: list[str]
) -> None:
    page = browser.get(f"/ui/devices?{query}")
    assert shown(page) == expected
    assert total(page) == len(expected)


def test_a_filter_with_no_match_says_so_and_offers_the_way_back(
    browser: Browser, fleet: World
) -> None:
    page = browser.get("/ui/devices?q=submarine")
    assert shown(page) == []
    assert "No device matches these filters" in page.text
    assert 'value="submarine"' in page.text  # the search box keeps what was typed


def test_an_empty_fleet_points_at_enrollment(browser: Browser) -> None:
    page = browser.get("/ui/devices")
    assert "No device has enrolled yet" in page.text
    assert 'href="/ui/tokens"' in page.text


def test_rows_show_status_group_tags_models_and_link_to_filters(
    browser: Browser, fleet: World
) -> None:
    page = browser.get("/ui/devices?q=kiosk-02")
    assert shown(page) == ["kiosk-02"]
    assert ">degraded</span>" in page.text
    assert "gemma3 1.0, minilm ?" in page.text
    page = browser.get("/ui/devices?q=cam-001")
    assert 'href="/ui/devices?q=cam-001&amp;tag=outdoor"' in page.text
    assert 'href="/ui/devices?q=cam-001&amp;group=lab"' in page.text


# --- sort and pages -----------------------------------------------------------------------


def many(world: World, count: int) -> list[str]:
    ids = [f"dev-{i:03d}" for i in range(count)]
    start = world.clock()
    with Session(world.db) as session:
        for i, device_id in enumerate(ids):
            session.add(
                Device(
                    id=device_id,
                    name=f"device {i:03d}",
                    group="lab" if i % 2 else None,
                    public_key=sha(device_id)[:44],
                    mqtt_password_hash="x",
                    agent_version=f"0.{i % 3}",
                    online=i % 4 != 0,
                    last_seen=start - timedelta(minutes=i),
                )
            )
        session.commit()
    return ids


@pytest.mark.parametrize(
    ("sort", "first"),
    [
        ("sort=name", "dev-000"),
        ("sort=name&order=desc", "dev-029"),
        ("sort=last_seen&order=desc", "dev-000"),  # the most recent
        ("sort=last_seen", "dev-029"),
        ("sort=agent&order=desc", "dev-029"),  # 0.2, newest id first among equals
        ("sort=status", "dev-001"),  # online first
        ("sort=status&order=desc", "dev-028"),  # offline first
        ("sort=group", "dev-001"),  # lab, then no group
    ],
)
def test_sorting_orders_the_whole_list_not_the_page(
    browser: Browser, world: World, sort: str, first: str
) -> None:
    many(world, 30)
    assert shown(browser.get(f"/ui/devices?{sort}"))[0] == first


def test_pages_cut_the_sorted_list_and_say_where_they_are(browser: Browser, world: World) -> None:
    ids = many(world, 30)
    first = browser.get("/ui/devices?per_page=25")
    assert shown(first) == ids[:25]
    assert ">30</strong> devices · showing 1–25 · page 1 of 2" in first.text
    assert 'href="/ui/devices?page=2&amp;per_page=25"' in first.text
    second = browser.get("/ui/devices?per_page=25&page=2")
    assert shown(second) == ids[25:]
    assert "showing 26–30 · page 2 of 2" in second.text
    # A page past the end (the list shrank since the link was made) shows the last one.
    assert shown(browser.get("/ui/devices?per_page=25&page=9")) == ids[25:]


# --- htmx ---------------------------------------------------------------------------------


def test_htmx_gets_only_the_table_and_a_history_restore_the_page(
    browser: Browser, fleet: World
) -> None:
    htmx = {"HX-Request": "true", "HX-Target": "device-table"}
    table = browser.get("/ui/devices?q=camera", headers=htmx)
    assert table.text.lstrip().startswith('<div id="device-table"')
    assert "<html" not in table.text
    assert shown(table) == ["cam-002", "cam-001"]
    assert "HX-Target" in table.headers["vary"]
    restore = browser.get(
        "/ui/devices?q=camera", headers={**htmx, "HX-History-Restore-Request": "true"}
    )
    assert "<html" in restore.text
    assert shown(restore) == ["cam-002", "cam-001"]


def test_the_filter_form_swaps_the_table_and_pushes_the_url(browser: Browser) -> None:
    page = browser.get("/ui/devices")
    form = re.search(r'<form id="device-filters"[^>]*>', page.text)
    assert form is not None
    for attribute in (
        'method="get"',
        'action="/ui/devices"',
        'hx-get="/ui/devices"',
        'hx-target="#device-table"',
        'hx-push-url="true"',
    ):
        assert attribute in form.group(0)
    assert 'type="search" name="q" id="device-search"' in page.text


def test_a_bad_parameter_gives_an_html_error_page(browser: Browser) -> None:
    page = browser.get("/ui/devices?status=sleeping")
    assert page.status_code == 422
    assert "<html" in page.text
    assert "status must be one of" in page.text


def test_a_viewer_may_list_devices(browser_as: Any, fleet: World) -> None:
    assert shown(browser_as("vera").get("/ui/devices?status=offline")) == ["kiosk-01"]


# --- 10,000 devices -----------------------------------------------------------------------


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement the app's requests run (in AnyIO's worker threads, where FastAPI
    runs sync routes) while the test watches; the background loops use asyncio's threads.
    """
    seen: list[tuple[str, Any]] = []

    def record(*args: Any) -> None:  # (connection, cursor, statement, parameters, ...)
        if threading.current_thread().name == "AnyIO worker thread":
            seen.append((str(args[2]), args[3]))

    sa.event.listen(engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", record)


def test_ten_thousand_devices_are_counted_and_paged_in_the_database(
    browser: Browser, world: World, statements: list[tuple[str, Any]]
) -> None:
    rows = [
        {
            "id": f"dev-{i:05d}",
            "name": f"edge {i:05d}",
            "group": "lab" if i % 10 == 0 else None,
            "public_key": sha(str(i))[:44],
            "mqtt_password_hash": "x",
            "agent_version": "0.9",
            "device_report": {},
            "enrolled_at": world.clock(),
            "online": i % 3 != 0,
            "desired_version": 0,
            "telemetry_dropped": 0,
        }
        for i in range(10_000)
    ]
    with Session(world.db) as session:
        session.execute(sa.insert(Device), rows)
        session.commit()
    statements.clear()
    page = browser.get("/ui/devices?sort=last_seen&order=desc&status=online&q=edge%2001")
    assert total(page) == 667  # "edge 01...": 1,000 of them, online unless i % 3 == 0
    assert len(shown(page)) == 50
    assert "page 1 of 14" in page.text
    assert shown(browser.get("/ui/devices?page=200"))[-1] == "dev-09999"
    listed = [(s, p) for s, p in statements if re.search(r"\bFROM devices\b", s)]
    assert listed
    for statement, parameters in listed:  # never the whole fleet into Python:
        if "WHERE devices.id IN (" in statement:  # the page's rows, by id
            assert len(parameters) <= 50, statement
        else:  # or a filtered, sorted page of ids and the count
            assert "count(" in statement.lower(), statement
            assert "LIMIT" in statement, statement
