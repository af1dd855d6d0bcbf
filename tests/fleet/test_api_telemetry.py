"""Telemetry buckets, raw samples, events and the fleet summary, on rows written directly.

The MQTT ingest writes these rows in production; here the test writes them, so every
expected number below is computed by hand from the rows.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.tables import EventRow, TelemetryRow
from tests.fleet.helpers import Clock, enroll, error

T0 = datetime(2031, 5, 6, 12, 0, 0, tzinfo=UTC)


def _sample(device_id: str, ts: datetime, seq: int, **values: Any) -> TelemetryRow:
    fields: dict[str, Any] = {
        "window_s": 10.0,
        "requests": 0,
        "errors": 0,
        "rejections": 0,
        "queue_depth": 0,
        "model_memory_bytes": 0,
    }
    fields.update(values)
    return TelemetryRow(
        device_id=device_id,
        sample_id=uuid.uuid4().hex,
        seq=seq,
        ts=ts,
        sent_at=ts,
        stored_at=ts,
        **fields,
    )


def _insert(engine: Engine, rows: list[Any]) -> None:
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()


@pytest.fixture
def device_id(api: TestClient, clock: Clock) -> str:
    clock.now = T0 + timedelta(hours=1)
    return str(enroll(api, clock)["device_id"])


def _series(api: TestClient, device_id: str, **params: Any) -> dict[str, Any]:
    response = api.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_buckets_aggregate_in_sql(api: TestClient, engine: Engine, device_id: str) -> None:
    other = enroll(api, Clock(T0 + timedelta(hours=1)))["device_id"]
    _insert(
        engine,
        [
            _sample(
                device_id,
                T0 + timedelta(seconds=10),
                1,
                requests=10,
                errors=1,
                rejections=0,
                latency_p50_ms=100.0,
                latency_p95_ms=200.0,
                tokens_per_s=20.0,
                queue_depth=3,
                process_memory_bytes=1000,
                model_memory_bytes=500,
                gpu_utilization_percent=50.0,
            ),
            _sample(
                device_id,
                T0 + timedelta(seconds=50),
                2,
                requests=20,
                errors=0,
                rejections=2,
                latency_p50_ms=300.0,
                latency_p95_ms=600.0,
                tokens_per_s=40.0,
                queue_depth=1,
                process_memory_bytes=3000,
                model_memory_bytes=700,
            ),
            _sample(device_id, T0 + timedelta(seconds=65), 3, requests=5, latency_p95_ms=50.0),
            _sample(device_id, T0 + timedelta(minutes=3), 4, requests=7, errors=7),
            _sample(device_id, T0 - timedelta(seconds=1), 0, requests=1000),  # before since
            _sample(device_id, T0 + timedelta(minutes=10), 5, requests=1000),  # at until
            _sample(other, T0 + timedelta(seconds=20), 1, requests=1000),  # another device
        ],
    )

    series = _series(
        api,
        device_id,
        since=T0.isoformat(),
        until=(T0 + timedelta(minutes=10)).isoformat(),
        bucket_s=60,
    )

    buckets = series["buckets"]
    assert [b["start"][:19] for b in buckets] == [
        "2031-05-06T12:00:00",
        "2031-05-06T12:01:00",
        "2031-05-06T12:03:00",
    ]
    first, second, third = buckets
    assert (first["samples"], first["requests"], first["errors"], first["rejections"]) == (
        2,
        30,
        1,
        2,
    )
    assert first["latency_p50_ms_avg"] == pytest.approx(200.0)
    assert first["latency_p95_ms_avg"] == pytest.approx(400.0)
    assert first["latency_p95_ms_max"] == pytest.approx(600.0)
    assert first["tokens_per_s_avg"] == pytest.approx(30.0)
    assert first["queue_depth_max"] == 3
    assert first["memory_bytes_avg"] == pytest.approx(2000.0)
    assert first["memory_bytes_max"] == 3000
    assert first["model_memory_bytes_max"] == 700
    assert first["gpu_utilization_percent_avg"] == pytest.approx(50.0)  # NULLs ignored
    assert second["samples"] == 1
    assert second["latency_p95_ms_max"] == pytest.approx(50.0)
    assert second["latency_p50_ms_avg"] is None
    assert second["gpu_utilization_percent_avg"] is None
    assert (third["requests"], third["errors"]) == (7, 7)

    totals = series["totals"]
    assert (totals["samples"], totals["requests"], totals["errors"], totals["rejections"]) == (
        4,
        42,
        8,
        2,
    )
    assert totals["latency_p95_ms_avg"] == pytest.approx((200 + 600 + 50) / 3)
    assert totals["latency_p95_ms_max"] == pytest.approx(600.0)
    assert series["bucket_s"] == 60
    assert series["device_id"] == device_id


def test_wide_buckets_align_to_the_epoch(api: TestClient, engine: Engine, device_id: str) -> None:
    _insert(
        engine,
        [
            _sample(device_id, T0 + timedelta(minutes=4, seconds=59), 1, requests=1),
            _sample(device_id, T0 + timedelta(minutes=5), 2, requests=2),
            _sample(device_id, T0 + timedelta(minutes=9, seconds=59), 3, requests=4),
        ],
    )
    series = _series(
        api,
        device_id,
        since=T0.isoformat(),
        until=(T0 + timedelta(hours=1)).isoformat(),
        bucket_s=300,
    )
    assert [(b["start"][11:19], b["requests"]) for b in series["buckets"]] == [
        ("12:00:00", 1),
        ("12:05:00", 6),
    ]


def test_range_accepts_other_timezones(api: TestClient, engine: Engine, device_id: str) -> None:
    _insert(engine, [_sample(device_id, T0 + timedelta(seconds=30), 1, requests=3)])
    since = (T0 + timedelta(hours=2)).replace(tzinfo=None).isoformat() + "+02:00"  # == T0
    series = _series(api, device_id, since=since, bucket_s=3600)
    assert series["totals"]["requests"] == 3
    assert series["since"].startswith("2031-05-06T12:00:00")


def test_default_range_is_the_last_hour(api: TestClient, engine: Engine, device_id: str) -> None:
    # the app's clock is T0 + 1 h
    _insert(
        engine,
        [
            _sample(device_id, T0 + timedelta(minutes=1), 1, requests=1),
            _sample(device_id, T0 - timedelta(minutes=1), 0, requests=100),
        ],
    )
    assert _series(api, device_id)["totals"]["requests"] == 1


def test_empty_range_has_zero_totals(api: TestClient, device_id: str) -> None:
    series = _series(api, device_id)
    assert series["buckets"] == []
    assert series["totals"]["samples"] == 0
    assert series["totals"]["requests"] == 0
    assert series["totals"]["latency_p95_ms_max"] is None


def test_raw_samples_bounded(api: TestClient, engine: Engine, device_id: str) -> None:
    _insert(
        engine,
        [_sample(device_id, T0 + timedelta(seconds=10 * i), i, requests=i) for i in range(5)],
    )
    params = {"since": T0.isoformat(), "raw": "true"}
    everything = _series(api, device_id, **params)
    assert [s["seq"] for s in everything["samples"]] == [0, 1, 2, 3, 4]
    assert everything["truncated"] is False
    assert everything["samples"][1]["ts"].startswith("2031-05-06T12:00:10")
    some = _series(api, device_id, limit=2, **params)
    assert [s["seq"] for s in some["samples"]] == [0, 1]
    assert some["truncated"] is True


def test_bad_ranges_are_422(api: TestClient, device_id: str) -> None:
    url = f"/api/v1/devices/{device_id}/telemetry"
    backwards = {"since": T0.isoformat(), "until": (T0 - timedelta(hours=1)).isoformat()}
    assert error(api.get(url, params=backwards))[0] == 422
    too_many = {"since": (T0 - timedelta(days=30)).isoformat(), "until": T0.isoformat()}
    status, _, message = error(api.get(url, params={**too_many, "bucket_s": 1}))
    assert status == 422
    assert "buckets" in message
    assert error(api.get(url, params={"bucket_s": 0}))[0] == 422
    assert error(api.get(url, params={"limit": 100_000, "raw": "true"}))[0] == 422


def test_telemetry_of_unknown_device_is_404(api: TestClient) -> None:
    assert error(api.get("/api/v1/devices/dev-0000000000000000/telemetry"))[0] == 404


def _event(device_id: str, ts: datetime, kind: str, severity: str = "info") -> EventRow:
    return EventRow(
        device_id=device_id,
        event_id=uuid.uuid4().hex,
        ts=ts,
        kind=kind,
        severity=severity,
        message=f"{kind} at {ts:%H:%M}",
        data={"n": 1},
        stored_at=ts,
    )


def test_events_newest_first_with_kind_filter(
    api: TestClient, engine: Engine, device_id: str
) -> None:
    _insert(
        engine,
        [
            _event(device_id, T0 + timedelta(minutes=1), "online"),
            _event(device_id, T0 + timedelta(minutes=2), "model_failed", "error"),
            _event(device_id, T0 + timedelta(minutes=3), "offline"),
            _event(device_id, T0 - timedelta(hours=2), "online"),  # out of the default range
        ],
    )
    url = f"/api/v1/devices/{device_id}/events"
    items = api.get(url).json()["items"]
    assert [e["kind"] for e in items] == ["offline", "model_failed", "online"]
    assert items[1]["severity"] == "error"
    assert items[1]["data"] == {"n": 1}
    assert items[0]["ts"].startswith("2031-05-06T12:03:00")
    assert [e["kind"] for e in api.get(url, params={"kind": "online"}).json()["items"]] == [
        "online"
    ]
    assert len(api.get(url, params={"limit": 1}).json()["items"]) == 1
    wide = {"since": (T0 - timedelta(days=1)).isoformat()}
    assert len(api.get(url, params=wide).json()["items"]) == 4


def test_summary_counts_the_fleet_and_the_window(
    api: TestClient, engine: Engine, clock: Clock, device_id: str
) -> None:
    # clock is T0 + 1 h; the window is the last 15 minutes
    now = clock.now
    second = enroll(api, clock)["device_id"]
    revoked = enroll(api, clock)["device_id"]
    api.post(f"/api/v1/devices/{revoked}/revoke")
    from sqlalchemy import update
    from sqlmodel import col

    from fleet.tables import Device

    with Session(engine) as session:
        session.exec(update(Device).where(col(Device.id) == device_id).values(online=True))
        session.commit()
    _insert(
        engine,
        [
            _sample(device_id, now - timedelta(minutes=1), 1, requests=4, errors=1),
            _sample(second, now - timedelta(minutes=2), 1, requests=6, rejections=3),
            _sample(second, now - timedelta(minutes=20), 0, requests=100),  # outside
            _event(device_id, now - timedelta(minutes=1), "online"),
            _event(second, now - timedelta(minutes=1), "reconcile_failed", "warning"),
        ],
    )
    summary = api.get("/api/v1/telemetry/summary").json()
    assert summary["devices"] == {"total": 3, "online": 1, "offline": 1, "revoked": 1}
    assert summary["window_s"] == 900
    assert (summary["samples"], summary["reporting_devices"]) == (2, 2)
    assert (summary["requests"], summary["errors"], summary["rejections"]) == (10, 1, 3)
    assert (summary["events"], summary["warnings"]) == (2, 1)
    wider = api.get("/api/v1/telemetry/summary", params={"window_s": 3600}).json()
    assert wider["samples"] == 3
    assert wider["requests"] == 110
