"""The pure parts of scripts/bench_dashboard.py: timings, requests, the figures and the table."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_dashboard as bench  # noqa: E402

FLEET = bench.Fleet(
    devices=[f"dev-{i:016x}" for i in range(500)],
    groups=["retail-berlin", "factory-lyon"],
    tags=["kiosk", "pilot"],
    rollout="ro-0123456789",
    names=["berlin", "lyon"],
)


@pytest.mark.parametrize(
    ("header", "ms"),
    [
        ("app;dur=12.5", 12.5),
        ('db;dur=3, app;desc="render";dur=7', 7.0),
        ('app;dur="4"', 4.0),
        ("total;dur=9", None),
        ("app", None),
        ("app;dur=soon", None),
        ("", None),
        (None, None),
    ],
)
def test_server_timing(header: str | None, ms: float | None) -> None:
    assert bench.server_timing_ms(header) == ms


def test_summary_and_timings() -> None:
    figures = bench.summary([float(v) for v in range(1, 101)])
    assert figures == {"n": 100, "p50_ms": 50.5, "p95_ms": pytest.approx(95.05), "max_ms": 100.0}
    assert bench.summary([]) == {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    timed = [bench.Timed(200, 10.0, 8.0), bench.Timed(200, 12.0, None)]
    assert bench.timing_of(timed) == "wall"
    assert bench.timing_of(timed[:1]) == "server"
    assert bench.series(timed, "server") == [8.0]
    assert bench.series(timed, "wall") == [10.0, 12.0]


def test_a_reference_of_several_calls_adds_them() -> None:
    both = bench.combine([bench.Timed(200, 10.0, 4.0), bench.Timed(404, 5.0, 1.0)])
    assert (both.status, both.wall_ms, both.server_ms) == (404, 15.0, 5.0)
    assert (
        bench.combine([bench.Timed(200, 1.0, 1.0), bench.Timed(200, 1.0, None)]).server_ms is None
    )


def test_goal_and_ratio() -> None:
    assert bench.judge(299.9) == "met"
    assert bench.judge(300.0) == "NOT met"
    assert bench.judge(None) == "-"
    assert bench.ratio(30.0, 10.0) == 3.0
    assert bench.ratio(1.0, 0.0) is None
    assert bench.ratio(None, 1.0) is None


def test_requests_vary_and_ask_the_api_for_the_same_data() -> None:
    made = [bench.device_list(FLEET, i, random.Random(1)) for i in range(30)]
    assert made == [bench.device_list(FLEET, i, random.Random(1)) for i in range(30)]
    assert len({r.page for r in made}) > 20  # another page, sort or filter every time
    for request in made:
        assert request.page.startswith("/ui/devices?")
        assert request.reference[0].startswith("/api/v1/devices?")
        for key in ("group=", "tag=", "status=", "q="):
            assert (key in request.page) == (key in request.reference[0])
    rng = random.Random(2)
    devices = {bench.device_page(FLEET, i, rng).page for i in range(20)}
    assert len(devices) > 10
    detail = bench.device_page(FLEET, 0, rng)
    assert len(detail.reference) == 3  # detail, telemetry, events
    assert bench.live_rollout(FLEET, 0, rng).page == f"/ui/rollouts/{FLEET.rollout}"


def page_result(name: str, p95: float, **extra: Any) -> dict[str, Any]:
    figures = {"n": 50, "p50_ms": p95 / 2, "p95_ms": p95, "max_ms": p95 * 2}
    return {
        "name": name,
        "route": "/ui/x",
        "status": "ok",
        "errors": {},
        "timing": "wall",
        "reference_timing": "wall",
        "page": figures,
        "reference": {**figures, "p95_ms": p95 / 4},
        "ratio_p50": 2.0,
        "ratio_p95": 4.0,
        "goal": bench.judge(p95),
        **extra,
    }


def test_report_shows_missing_pages_goals_and_warnings() -> None:
    doc = {
        "machine": {"busy_cores_at_start": 0.5},
        "backends": [
            {
                "backend": "sqlite",
                "status": "ok",
                "seed": {"rows": {"devices": 10_000, "telemetry": 5_615_868, "events": 72_589},
                         "seconds": {"total": 612.3}},
                "pages": [
                    page_result("device list", 120.0),
                    page_result("live rollout", 420.0),
                    {"name": "fleet overview", "route": "/ui/", "status": "missing"},
                ],
                "cpu_cores": {"other": 0.4, "steal": 0.0},
            },
            {"backend": "postgres", "status": "skipped", "reason": "no PostgreSQL", "pages": []},
        ],
    }  # fmt: skip
    doc["warnings"] = bench.contention_warnings(doc, limit=0.15)
    text = bench.report(doc)
    assert "10,000 devices, 5,615,868 telemetry samples" in text
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["device list"].rstrip().endswith("met")
    assert rows["live rollout"].rstrip().endswith("NOT met")
    assert rows["fleet overview"].rstrip().endswith("missing")
    assert "skipped: no PostgreSQL" in text
    assert len(doc["warnings"]) == 2  # busy before, and others busy during the sqlite run
    assert text.count("WARNING:") == 2


def test_backends() -> None:
    assert bench.parse_backends("sqlite,postgresql") == ["sqlite", "postgres"]
    assert bench.parse_backends("postgres, postgres") == ["postgres"]
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_backends("mysql")
