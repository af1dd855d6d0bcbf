"""Ingest: parsing is pure and never raises; the batch writer stores each message once."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, select

from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.errors import DatabaseUnavailable
from fleet.link import store
from fleet.link.ingest import Accepted, Reason, Rejection, parse
from fleet.link.logs import RateLimitedLog
from fleet.link.passwords import hash_password
from fleet.link.router import IngestRouter
from fleet.link.session import Acknowledger
from fleet.link.writer import BatchWriter
from fleet.tables import Device, EventRow, LoginAttempt, TelemetryRow, User, WebSession, as_utc
from models.topics import Channel
from models.wire import (
    MAX_PAYLOAD_BYTES,
    Event,
    EventKind,
    ReportedState,
    TelemetryBatch,
    TelemetrySample,
    WireModel,
    encode,
)
from tests.polling import eventually, in_time

A = "dev-aaa"
B = "dev-bbb"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
log = logging.getLogger(__name__)


def uid() -> str:
    return uuid.uuid4().hex


def sample(seq: int = 0, **fields: object) -> TelemetrySample:
    values: dict[str, object] = {
        "id": uid(),
        "seq": seq,
        "ts": NOW,
        "window_s": 5.0,
        "requests": 3,
        "errors": 0,
        "rejections": 0,
    }
    values.update(fields)
    return TelemetrySample.model_validate(values)


def batch(device: str = A, samples: int = 2, dropped: int = 0) -> TelemetryBatch:
    return TelemetryBatch(
        device_id=device,
        id=uid(),
        samples=[sample(i) for i in range(samples)],
        dropped=dropped,
    )


def event(device: str = A, kind: EventKind = EventKind.MODEL_READY) -> Event:
    return Event(device_id=device, id=uid(), kind=kind, message="hello")


def report(device: str = A, at: datetime = NOW, version: str = "1.0") -> ReportedState:
    return ReportedState(device_id=device, converged=True, agent_version=version, reported_at=at)


def topic(device: str, channel: str) -> str:
    return f"edgefleet/v1/devices/{device}/{channel}"


def accept(message: WireModel, channel: str, *, retained: bool = False) -> Accepted:
    device = str(getattr(message, "device_id", ""))
    result = parse(topic(device, channel), encode(message), received_at=NOW, retained=retained)
    assert isinstance(result, Accepted), result
    return result


# --- parsing ------------------------------------------------------------------------------


def test_parse_accepts_each_upstream_channel() -> None:
    assert accept(batch(), "telemetry").rows == 2
    assert accept(event(), "events").channel is Channel.EVENTS
    assert accept(report(), "reported").device_id == A


@pytest.mark.parametrize(
    ("where", "payload", "reason"),
    [
        ("not/ours", b"{}", Reason.BAD_TOPIC),
        (topic("Bad_Id", "telemetry"), b"{}", Reason.BAD_TOPIC),
        (topic(A, "nonsense"), b"{}", Reason.BAD_TOPIC),
        (topic(A, "desired"), b"{}", Reason.BAD_TOPIC),  # devices never publish downstream
        (topic(A, "telemetry") + "/extra", b"{}", Reason.BAD_TOPIC),
        (topic(A, "telemetry"), b"\xff\xfe garbage", Reason.INVALID),
        (topic(A, "telemetry"), encode(batch())[:-7], Reason.INVALID),
        (topic(A, "telemetry"), b'{"device_id": 5, "id": [], "samples": "x"}', Reason.INVALID),
        (topic(A, "events"), encode(batch()), Reason.INVALID),  # the wrong model
        (topic(A, "telemetry"), b" " * (MAX_PAYLOAD_BYTES + 1), Reason.OVERSIZED),
        (topic(A, "telemetry"), encode(batch(B)), Reason.DEVICE_MISMATCH),
        (topic(A, "events"), encode(event(B)), Reason.DEVICE_MISMATCH),
        (topic(A, "reported"), encode(report(B)), Reason.DEVICE_MISMATCH),
        (topic(A, "telemetry"), b"", Reason.INVALID),
    ],
)
def test_parse_rejects_with_a_reason(where: str, payload: bytes, reason: Reason) -> None:
    result = parse(where, payload, received_at=NOW)
    assert isinstance(result, Rejection)
    assert result.reason is reason, result
    assert result.detail


def test_parse_rejects_values_the_columns_cannot_hold() -> None:
    huge = TelemetryBatch(device_id=A, id=uid(), samples=[sample(requests=2**31)])
    result = parse(topic(A, "telemetry"), encode(huge), received_at=NOW)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.OUT_OF_RANGE
    nul = Event(device_id=A, id=uid(), kind=EventKind.MODEL_FAILED, message="a\x00b")
    result = parse(topic(A, "events"), encode(nul), received_at=NOW)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.OUT_OF_RANGE


# --- storing ------------------------------------------------------------------------------


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        for device in (A, B):
            session.add(
                Device(
                    id=device,
                    name=device,
                    public_key=uid(),
                    mqtt_password_hash=hash_password("x"),
                )
            )
        session.commit()
    yield engine
    engine.dispose()


def device(engine: sa.Engine, device_id: str = A) -> Device:
    with Session(engine) as session:
        found = session.get(Device, device_id)
        assert found is not None
        return found


def count(engine: sa.Engine, table: type[SQLModel]) -> int:
    with Session(engine) as session:
        return len(session.exec(select(table)).all())


def test_a_batch_is_stored_and_a_replay_stores_nothing_more(engine: sa.Engine) -> None:
    items = [
        accept(batch(samples=3), "telemetry"),
        accept(batch(B, samples=2), "telemetry"),
        accept(event(), "events"),
        accept(report(), "reported"),
    ]
    first = store.write_batch(engine, items)
    assert (first.stored, first.duplicates, first.failed) == (6, 0, [])
    again = store.write_batch(engine, items)
    assert (again.stored, again.duplicates) == (0, 6)
    assert count(engine, TelemetryRow) == 5
    assert count(engine, EventRow) == 1
    with Session(engine) as session:
        row = session.exec(select(TelemetryRow).where(TelemetryRow.device_id == A)).first()
        assert row is not None
        assert as_utc(row.ts) == NOW
        assert as_utc(row.stored_at) is not None
        assert row.requests == 3


def test_the_same_sample_twice_in_one_batch_counts_once(engine: sa.Engine) -> None:
    item = accept(batch(samples=2), "telemetry")
    result = store.write_batch(engine, [item, item])
    assert (result.stored, result.duplicates) == (2, 2)


def test_every_message_is_a_sign_of_life_except_a_retained_copy(engine: sa.Engine) -> None:
    store.write_batch(engine, [accept(report(), "reported", retained=True)])
    assert not device(engine).online
    assert device(engine).last_seen is None
    assert device(engine).reported is not None  # still the state it reports
    store.write_batch(engine, [accept(batch(), "telemetry")])
    assert device(engine).online
    assert as_utc(device(engine).last_seen) == NOW


def test_offline_and_online_events_set_presence(engine: sa.Engine) -> None:
    store.write_batch(engine, [accept(event(kind=EventKind.ONLINE), "events")])
    assert device(engine).online
    store.write_batch(engine, [accept(event(kind=EventKind.OFFLINE), "events")])
    assert not device(engine).online
    # Within one batch the last message wins.
    store.write_batch(
        engine,
        [accept(event(kind=EventKind.OFFLINE), "events"), accept(batch(), "telemetry")],
    )
    assert device(engine).online


def test_reported_state_latest_wins_and_retained_copies_never_go_back(engine: sa.Engine) -> None:
    store.write_batch(engine, [accept(report(at=NOW, version="2.0"), "reported")])
    older = report(at=NOW - timedelta(hours=1), version="1.0")
    store.write_batch(engine, [accept(older, "reported", retained=True)])
    stored = device(engine)
    assert stored.reported is not None
    assert stored.reported["agent_version"] == "2.0"
    assert stored.agent_version == "2.0"
    assert as_utc(stored.reported_at) == NOW
    # A live report always wins, even with an older clock (a device whose RTC reset).
    store.write_batch(engine, [accept(older, "reported")])
    assert device(engine).agent_version == "1.0"
    # Two reports in one batch: the later one.
    store.write_batch(
        engine,
        [accept(report(version="3.0"), "reported"), accept(report(version="4.0"), "reported")],
    )
    assert device(engine).agent_version == "4.0"


def test_a_live_report_committed_late_never_replaces_a_newer_one(engine: sa.Engine) -> None:
    """Replicas sharing ingest commit in any order: the device's clock orders its reports."""
    newer = report(at=NOW - timedelta(seconds=1), version="2.0")
    older = report(at=NOW - timedelta(seconds=2), version="1.0")
    store.write_batch(engine, [accept(newer, "reported")])
    store.write_batch(engine, [accept(older, "reported")])  # held by a slower replica
    assert device(engine).agent_version == "2.0"
    assert as_utc(device(engine).reported_at) == NOW - timedelta(seconds=1)


def test_a_report_dated_in_the_future_is_replaced_once_the_clock_is_fixed(
    engine: sa.Engine,
) -> None:
    ahead = report(at=NOW + store.CLOCK_SKEW * 3, version="1.0")
    store.write_batch(engine, [accept(ahead, "reported")])  # off clock: wins as it arrives
    assert device(engine).agent_version == "1.0"
    fixed = report(at=NOW, version="2.0")
    store.write_batch(engine, [accept(fixed, "reported")])
    assert device(engine).agent_version == "2.0"
    # A report dated within the skew, but older than what is stored, still loses.
    store.write_batch(engine, [accept(report(at=NOW - timedelta(minutes=5)), "reported")])
    assert device(engine).agent_version == "2.0"


def test_dropped_samples_count_once_per_batch(engine: sa.Engine) -> None:
    item = accept(batch(dropped=7), "telemetry")
    store.write_batch(engine, [item])
    store.write_batch(engine, [item])  # a replay of the same batch
    store.write_batch(engine, [accept(batch(dropped=3), "telemetry")])
    assert device(engine).telemetry_dropped == 10


def test_a_message_the_database_refuses_does_not_sink_the_batch(engine: sa.Engine) -> None:
    # A device deleted between the check and the write is the realistic case; a string
    # longer than its column (PostgreSQL refuses it; SQLite does not) stands in for it.
    good = [accept(batch(samples=1), "telemetry") for _ in range(5)]
    too_long = ReportedState.model_construct(
        device_id=A, converged=True, agent_version="x" * 200, reported_at=NOW, models=[]
    )
    bad = Accepted(A, Channel.REPORTED, too_long, NOW)
    result = store.write_batch(engine, [*good[:2], bad, *good[2:]])
    assert result.stored == 5
    if engine.dialect.name == "postgresql":
        assert [item for item, _ in result.failed] == [bad]
    assert count(engine, TelemetryRow) == 5


def test_presence_marks_silent_devices_offline(engine: sa.Engine) -> None:
    store.write_batch(engine, [accept(batch(), "telemetry"), accept(batch(B), "telemetry")])
    assert store.mark_offline(engine, NOW - timedelta(seconds=1)) == 0
    assert store.mark_offline(engine, NOW + timedelta(seconds=1)) == 2
    assert not device(engine).online
    assert store.mark_offline(engine, NOW + timedelta(seconds=1)) == 0


def test_retention_deletes_only_old_rows(engine: sa.Engine) -> None:
    old = TelemetryBatch(
        device_id=A, id=uid(), samples=[sample(0, ts=NOW - timedelta(days=40)), sample(1)]
    )
    old_event = Event(device_id=A, id=uid(), kind=EventKind.ONLINE, ts=NOW - timedelta(days=40))
    store.write_batch(engine, [accept(old, "telemetry"), accept(old_event, "events")])
    assert store.prune(engine, NOW - timedelta(days=30)) == (1, 1)
    assert count(engine, TelemetryRow) == 1
    assert count(engine, EventRow) == 0


def test_retention_deletes_old_sign_in_attempts_and_ended_sessions(engine: sa.Engine) -> None:
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=1)
    with Session(engine) as session:
        user = User(name="ada", role="admin", password_hash="x", created_by="t",
                    created_at=old, password_changed_at=old)  # fmt: skip
        session.add(user)
        session.flush()
        assert user.id is not None
        session.add_all(
            [LoginAttempt(at=at, name="ada", source="a", ok=False) for at in (old, recent)]
        )
        for key, expires, revoked in (("gone", old, None), ("out", NOW, old), ("live", NOW, None)):
            row = WebSession(id=key, user_id=user.id, csrf_token="c", created_at=old,
                             last_seen_at=old, expires_at=expires)  # fmt: skip
            row.revoked_at = revoked
            session.add(row)
        session.commit()
    store.prune(engine, NOW - timedelta(days=30))
    with Session(engine) as session:
        assert [a.at.day for a in session.exec(select(LoginAttempt))] == [recent.day]
        assert [s.id for s in session.exec(select(WebSession))] == ["live"]


def test_desired_and_credentials_reads(engine: sa.Engine) -> None:
    with Session(engine) as session:
        a = session.get(Device, A)
        b = session.get(Device, B)
        assert a is not None
        assert b is not None
        a.desired = {"device_id": A, "version": 1}
        a.desired_version = 1
        b.desired = {"device_id": B, "version": 1}
        b.desired_version = 1
        b.revoked_at = NOW
        session.add_all([a, b])
        session.commit()
    assert store.load_desired(engine) == [(A, {"device_id": A, "version": 1})]
    revoked = {c.device_id: c.revoked for c in store.load_credentials(engine)}
    assert revoked == {A: False, B: True}


# --- acknowledging only what is stored ------------------------------------------------------


class Acks:
    """What a fake paho client was asked to acknowledge, and what the database held then."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sent: list[int] = []
        self.events_stored_then: list[int] = []
        self.acknowledger = Acknowledger(self.ack)

    def ack(self, mid: int, qos: int) -> None:
        assert qos == 1
        self.sent.append(mid)
        self.events_stored_then.append(count(self.engine, EventRow))  # another connection


def writer_for(engine: sa.Engine, rejected: list[Rejection] | None = None) -> BatchWriter:
    return BatchWriter(
        engine,
        batch_rows=500,
        flush_s=0.001,
        retry_delay=lambda _attempt: 0.0,
        reject=(rejected if rejected is not None else []).append,
        warn=lambda *_args: None,
    )


def run_writer(scenario: Callable[[BatchWriter], Awaitable[None]], engine: sa.Engine) -> None:
    async def main() -> None:
        writer = writer_for(engine)
        flusher = asyncio.create_task(writer.run())
        try:
            await scenario(writer)
        finally:
            writer.close(0.0)
            await in_time(flusher, "the writer to stop")
            writer.shutdown()

    asyncio.run(main())


def test_no_message_is_acknowledged_before_the_write_that_stores_it_commits(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    acks = Acks(engine)
    writing, release = threading.Event(), threading.Event()
    real_write = store.write_batch

    def held_write(*args: Any) -> store.WriteResult:
        writing.set()
        release.wait(60)  # a safety net only: the test releases it
        return real_write(*args)

    monkeypatch.setattr(store, "write_batch", held_write)

    async def scenario(writer: BatchWriter) -> None:
        for mid in (1, 2):
            writer.add(accept(event(), "events"), acks.acknowledger.expect(mid, 1))
        await in_time(asyncio.to_thread(writing.wait, 60), "the write to start")
        assert acks.sent == []  # taken, written in a transaction not yet committed
        assert writer.backlog == 2
        release.set()
        await eventually(lambda: acks.sent == [1, 2], "both acknowledged")

    run_writer(scenario, engine)
    assert acks.events_stored_then == [2, 2]  # each PUBACK went out after the commit


def test_a_write_retried_while_the_database_is_down_acknowledges_after_the_retry(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    acks = Acks(engine)
    attempts: list[list[int]] = []  # what was acknowledged when each attempt began
    down = threading.Event()
    down.set()
    real_write = store.write_batch

    def flaky_write(*args: Any) -> store.WriteResult:
        attempts.append(list(acks.sent))
        if down.is_set():
            raise DatabaseUnavailable("database unavailable: connection refused")
        return real_write(*args)

    monkeypatch.setattr(store, "write_batch", flaky_write)

    async def scenario(writer: BatchWriter) -> None:
        writer.add(accept(event(), "events"), acks.acknowledger.expect(7, 1))
        await eventually(lambda: len(attempts) >= 3, "the write retried")
        assert acks.sent == []
        assert count(engine, EventRow) == 0
        down.clear()
        await eventually(lambda: acks.sent == [7], "acknowledged after the retry")
        assert writer.db_retries >= 3

    run_writer(scenario, engine)
    assert all(sent == [] for sent in attempts)  # nothing before the write that succeeded
    assert acks.events_stored_then == [1]


def test_duplicates_and_messages_refused_for_good_are_acknowledged_after_their_write(
    engine: sa.Engine,
) -> None:
    acks = Acks(engine)
    stored = accept(event(), "events")

    async def scenario(writer: BatchWriter) -> None:
        writer.add(stored, acks.acknowledger.expect(1, 1))
        await eventually(lambda: acks.sent == [1], "the first copy acknowledged")
        writer.add(stored, acks.acknowledger.expect(2, 1))  # redelivered: a duplicate
        await eventually(lambda: acks.sent == [1, 2], "the duplicate acknowledged")
        assert writer.duplicates == 1

    run_writer(scenario, engine)


def test_acknowledgements_go_out_in_the_order_the_messages_came(engine: sa.Engine) -> None:
    acks = Acks(engine)
    first = acks.acknowledger.expect(1, 1)
    second = acks.acknowledger.expect(2, 1)
    third = acks.acknowledger.expect(3, 1)
    second()
    third()
    assert acks.sent == []  # 1 is not settled yet: MQTT wants PUBACKs in order
    first()
    assert acks.sent == [1, 2, 3]
    late = acks.acknowledger.expect(4, 1)
    acks.acknowledger.close()  # the connection is gone: the broker redelivers 4
    late()
    assert acks.sent == [1, 2, 3]
    assert acks.acknowledger.waiting == 0


def test_the_router_acknowledges_rejections_at_once_and_parked_messages_once_stored(
    engine: sa.Engine, settings: FleetSettings
) -> None:
    acks = Acks(engine)

    async def scenario() -> None:
        router = IngestRouter(
            engine, settings, retry_delay=lambda _attempt: 0.0, warn=RateLimitedLog(log, 10)
        )
        async with router:
            # B is not in the directory yet: parked until it is re-read (at once).
            router.handle(
                topic(B, "events"), encode(event(B)), False, acks.acknowledger.expect(1, 1)
            )
            router.handle(topic(A, "events"), b"{not json", False, acks.acknowledger.expect(2, 1))
            assert acks.sent == []  # the rejection waits for the parked message before it
            await eventually(lambda: acks.sent == [1, 2], "the parked message stored")
            assert acks.events_stored_then == [1, 1]
            router.handle(topic(A, "events"), b"", False, acks.acknowledger.expect(3, 1))
            assert acks.sent == [1, 2, 3]  # nothing buffered: nothing to wait for
            assert router.rejected == {Reason.INVALID.value: 2}

    asyncio.run(scenario())
