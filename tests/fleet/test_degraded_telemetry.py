"""Fallback counts from telemetry to a rollout gate: ingest stores them, evidence reads them.

Samples go through the link's parser and batch writer into ``telemetry``; the rollout
evidence (:func:`fleet.rollout.evidence.gather`) turns the rows into the gates' samples,
and a ``fallback_rate`` gate with ``max_value=0.05`` decides on them, on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from fleet.db import make_engine
from fleet.link import store
from fleet.link.ingest import Accepted, Reason, Rejection, parse
from fleet.rollout.evidence import gather
from fleet.rollout.gates import check_gate
from fleet.rollout.plan import DeviceState
from fleet.rollout.spec import Gate
from fleet.tables import RolloutDevice, TelemetryRow
from models.wire import TelemetryBatch, TelemetrySample, encode

NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
DEVICES = ("dev-aaa", "dev-bbb")
GATE = Gate.model_validate({"metric": "fallback_rate", "max_value": 0.05, "window_s": 600})


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


def batch(device: str, *samples: Mapping[str, object]) -> TelemetryBatch:
    return TelemetryBatch(
        device_id=device,
        id=uuid.uuid4().hex,
        samples=[
            TelemetrySample.model_validate(
                {
                    "id": uuid.uuid4().hex,
                    "seq": i,
                    "ts": NOW - timedelta(seconds=10 * i),
                    "window_s": 10.0,
                    "requests": 100,
                    "errors": 0,
                    "rejections": 0,
                    **fields,
                }
            )
            for i, fields in enumerate(samples)
        ],
    )


def ingest(engine: sa.Engine, *batches: TelemetryBatch) -> None:
    items = []
    for b in batches:
        item = parse(f"edgefleet/v1/devices/{b.device_id}/telemetry", encode(b), received_at=NOW)
        assert isinstance(item, Accepted), item
        items.append(item)
    assert store.write_batch(engine, items, NOW).failed == []


def members() -> list[RolloutDevice]:
    issued = NOW - timedelta(minutes=5)
    return [
        RolloutDevice(
            rollout_id="r1",
            device_id=d,
            rank="0",
            state=DeviceState.UPDATED,
            since=issued,
            issued_at=issued,
        )
        for d in DEVICES
    ]


def check(engine: sa.Engine) -> tuple[str, list[str], dict[str, Any]]:
    with Session(engine) as session:
        cohorts = gather(session, members(), GATE.window_s, NOW)
    result = check_gate(GATE, cohorts.updated, cohorts.baseline, cohorts.control)
    return result.verdict, result.reasons, result.evidence


def test_ingest_stores_fallbacks_and_their_tiers(engine: sa.Engine) -> None:
    ingest(
        engine,
        batch(
            DEVICES[0],
            {"fallbacks": 7, "fallbacks_by_tier": {"cache": 4, "model": 3}},
            {"fallbacks": 0},
            {},  # an agent that does not count them
        ),
    )
    with Session(engine) as session:
        rows = session.exec(select(TelemetryRow).order_by(col(TelemetryRow.seq))).all()
    assert [(r.fallbacks, r.fallbacks_by_tier) for r in rows] == [
        (7, {"cache": 4, "model": 3}),
        (0, None),
        (None, None),
    ]


def test_ingest_refuses_a_tier_count_that_cannot_be_stored() -> None:
    for tiers, detail in (({"cache": -1}, "out of range"), ({"a\x00": 1}, "NUL")):
        bad = batch(DEVICES[0], {"fallbacks": 1, "fallbacks_by_tier": tiers})
        result = parse(f"edgefleet/v1/devices/{DEVICES[0]}/telemetry", encode(bad), received_at=NOW)
        assert isinstance(result, Rejection)
        assert result.reason is Reason.OUT_OF_RANGE
        assert detail in result.detail


def test_a_fallback_rate_gate_passes_under_its_limit_with_the_numbers(engine: sa.Engine) -> None:
    ingest(engine, *(batch(d, *[{"fallbacks": 2}] * 3) for d in DEVICES))  # 2%
    verdict, reasons, evidence = check(engine)
    assert (verdict, reasons) == ("pass", [])
    assert evidence["metric"] == "fallback_rate"
    assert evidence["updated"] == {"value": pytest.approx(0.02), "samples": 6, "devices": 2}
    assert evidence["thresholds"]["max_value"] == 0.05


def test_a_fallback_rate_gate_fails_above_its_limit(engine: sa.Engine) -> None:
    ingest(
        engine,
        batch(DEVICES[0], *[{"fallbacks": 20, "fallbacks_by_tier": {"model": 20}}] * 3),
        batch(DEVICES[1], *[{"fallbacks": 0}] * 3),
    )
    verdict, reasons, evidence = check(engine)
    assert verdict == "fail"
    assert reasons == ["fallback_rate 0.1 is above the limit 0.05"]
    assert evidence["updated"]["value"] == pytest.approx(0.1)


def test_samples_without_fallbacks_leave_the_gate_without_data(engine: sa.Engine) -> None:
    ingest(engine, *(batch(d, {}, {}, {}) for d in DEVICES))
    verdict, reasons, evidence = check(engine)
    assert verdict == "insufficient"
    assert reasons == ["0 sample(s) of the updated devices, 3 needed"]
    assert evidence["updated"]["value"] is None
