"""DeviceLink end to end: a real Mosquitto (or the embedded broker), real clients, a real database.

Every database test runs on SQLite and on PostgreSQL. Waits poll state with a
deadline; nothing sleeps a fixed time hoping something happened.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
import sqlalchemy as sa
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session, SQLModel, func, select

from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.errors import BrokerUnavailable, ConfigError
from fleet.link import DeviceLink, ReconnectPolicy, device_link
from fleet.link.broker_auth import AuthFiles, DeviceCredential
from fleet.link.embedded import EmbeddedBroker
from fleet.link.logs import RateLimitedLog
from fleet.link.passwords import hash_password
from fleet.link.session import MqttSession
from fleet.link.writer import Settle
from fleet.tables import Device, EventRow, TelemetryRow
from models.director import DirectorKeys, sign_desired, verify_desired
from models.wire import (
    MAX_PAYLOAD_BYTES,
    Command,
    CommandKind,
    DesiredModel,
    DesiredState,
    Event,
    EventKind,
    ReportedState,
    TelemetryBatch,
    TelemetrySample,
    encode,
    utc_now,
)
from scripts.servers import MosquittoBroker, free_port
from tests.polling import eventually, in_time

A = "dev-aaa"
B = "dev-bbb"
DEADLINE_S = 15.0
DIRECTOR = CryptoSigner.generate_ed25519()


def sign(state: DesiredState) -> bytes:
    return sign_desired(state, [DIRECTOR])


def verified(payload: Any) -> DesiredState:
    """What device A accepts from ``payload``: the director's signature is checked."""
    keys = DirectorKeys((DIRECTOR.public_key,), 1)
    return verify_desired(bytes(payload), keys, device_id=A, last_version=None, now=utc_now())


FAST = ReconnectPolicy(initial_s=0.05, max_s=0.5)


def uid() -> str:
    return uuid.uuid4().hex


def topic(device: str, channel: str) -> str:
    return f"edgefleet/v1/devices/{device}/{channel}"


def telemetry(device: str = A, samples: int = 2) -> TelemetryBatch:
    now = datetime.now(UTC)
    return TelemetryBatch(
        device_id=device,
        id=uid(),
        samples=[
            TelemetrySample(id=uid(), seq=i, ts=now, window_s=5, requests=1, errors=0, rejections=0)
            for i in range(samples)
        ],
    )


def reported(device: str = A, version: str = "1.0") -> ReportedState:
    return ReportedState(device_id=device, converged=True, agent_version=version)


class Fleet:
    """A database with devices in it, and settings pointing at the broker under test."""

    def __init__(self, engine: sa.Engine, settings: FleetSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.passwords: dict[str, str] = {}

    def enroll(self, *devices: str) -> None:
        with Session(self.engine) as session:
            for device in devices:
                self.passwords[device] = uid()
                session.add(
                    Device(
                        id=device,
                        name=device,
                        public_key=uid(),
                        mqtt_password_hash=hash_password(self.passwords[device]),
                    )
                )
            session.commit()

    def update(self, device_id: str, **values: Any) -> None:
        with Session(self.engine) as session:
            device = session.get(Device, device_id)
            assert device is not None
            for key, value in values.items():
                setattr(device, key, value)
            session.add(device)
            session.commit()

    def device(self, device_id: str) -> Device:
        with Session(self.engine) as session:
            device = session.get(Device, device_id)
            assert device is not None
            return device

    def count(self, table: type[SQLModel]) -> int:
        with Session(self.engine) as session:
            return int(session.exec(select(func.count()).select_from(table)).one())

    def link(self, **changes: Any) -> DeviceLink:
        settings = self.settings.model_copy(update=changes) if changes else self.settings
        return DeviceLink(settings, self.engine, sign_desired=sign, reconnect=FAST)

    @property
    def port(self) -> int:
        url = self.settings.broker_url
        assert url is not None
        return int(url.rsplit(":", 1)[1])

    def client(self, user: str, port: int | None = None, **options: Any) -> aiomqtt.Client:
        password = self.passwords.get(user)
        if password is None:  # the controller's own account, for forging messages
            password = (self.settings.data_dir / "broker-password").read_text().strip()
        # Devices connect with their id as client id, as enrollment tells them to.
        options.setdefault("identifier", user if user in self.passwords else f"{user}-{uid()[:8]}")
        return aiomqtt.Client(
            "127.0.0.1", port or self.port, username=user, password=password, timeout=5, **options
        )

    async def connect(self, stack: AsyncExitStack, user: str, **options: Any) -> aiomqtt.Client:
        """Log in as ``user``, retrying while the broker reloads its files."""

        async def logged_in() -> aiomqtt.Client:
            return await stack.enter_async_context(self.client(user, **options))

        return await eventually(
            logged_in,
            f"{user} to log in (the broker reloading its files)",
            within_s=DEADLINE_S,
            every_s=0.05,
            ignoring=(aiomqtt.MqttError,),
        )


async def until(check: Callable[[], Any], what: str) -> Any:
    """Wait for ``check`` to be truthy (:func:`tests.polling.eventually`, ``DEADLINE_S``).

    ``check`` runs in a thread: it may query the database.
    """
    return await eventually(check, what, within_s=DEADLINE_S, in_thread=True)


async def disconnected(client: aiomqtt.Client) -> None:
    """Read until the broker drops ``client`` (messages already on their way may come first)."""

    async def drain() -> None:
        async with asyncio.timeout(DEADLINE_S):
            async for _ in client.messages:
                pass

    with pytest.raises(aiomqtt.MqttError):
        await drain()


async def up(stack: AsyncExitStack, link: DeviceLink) -> DeviceLink:
    await stack.enter_async_context(link)
    async with asyncio.timeout(DEADLINE_S):
        await link.wait_connected()
    return link


@contextmanager
def make_fleet(database_url: str, tmp_path: Path, **settings: Any) -> Iterator[Fleet]:
    engine = make_engine(database_url)
    SQLModel.metadata.create_all(engine)
    defaults: dict[str, Any] = {"data_dir": tmp_path / "data", "ingest_flush_ms": 20}
    defaults.update(settings)
    yield Fleet(engine, FleetSettings(**defaults))
    engine.dispose()


@pytest.fixture
def fleet(database_url: str, tmp_path: Path, broker: MosquittoBroker) -> Iterator[Fleet]:
    with make_fleet(
        database_url,
        tmp_path,
        broker_url=broker.url,
        broker_auth_dir=broker.auth_dir,
        broker_pid_file=broker.pid_file,
    ) as built:
        yield built


def test_ingest_stores_a_batch_once_even_when_replayed(fleet: Fleet) -> None:
    fleet.enroll(A, B)
    batch = telemetry(samples=3)
    ev = Event(device_id=A, id=uid(), kind=EventKind.MODEL_READY, message="gemma ready")

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            a = await fleet.connect(stack, A)
            await a.publish(topic(A, "telemetry"), encode(batch), qos=1)
            await a.publish(topic(A, "events"), encode(ev), qos=1)
            await a.publish(topic(A, "reported"), encode(reported()), qos=1, retain=True)
            await until(lambda: link.status().stored == 4, "4 rows stored")
            await until(lambda: fleet.device(A).reported is not None, "reported stored")
            # The agent's spool replays after a reconnect: nothing is stored twice.
            await a.publish(topic(A, "telemetry"), encode(batch), qos=1)
            await a.publish(topic(A, "events"), encode(ev), qos=1)
            await until(lambda: link.status().duplicates == 4, "4 duplicates")
            status = link.status()
            assert (status.stored, status.rejected) == (4, 0)
            assert status.received == 5
        assert fleet.count(TelemetryRow) == 3
        assert fleet.count(EventRow) == 1
        stored = fleet.device(A)
        assert stored.online
        assert stored.last_seen is not None
        assert stored.agent_version == "1.0"

    asyncio.run(scenario())


def test_bad_input_is_rejected_counted_and_survived(fleet: Fleet) -> None:
    fleet.enroll(A, B)
    good = telemetry(samples=1)
    truncated = encode(telemetry())[:-10]
    wrong_types = b'{"device_id": "dev-aaa", "id": 7, "samples": {"a": 1}}'
    oversized = b'{"device_id": "dev-aaa", "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            # The controller's account may write anywhere, so it can forge what a broken
            # or hostile device would send if the ACL ever let it.
            forger = await fleet.connect(stack, fleet.settings.broker_username)
            for where, payload in [
                (topic(A, "telemetry"), b"\x00\xff\xfe garbage"),
                (topic(A, "telemetry"), truncated),
                (topic(A, "telemetry"), wrong_types),
                (topic(A, "events"), b"[]"),
                (topic(A, "telemetry"), oversized),
                (topic("dev-zzz", "telemetry"), encode(telemetry("dev-zzz"))),
                (topic(B, "telemetry"), encode(telemetry(A))),  # A's batch on B's topic
                (topic(A, "telemetry"), encode(good)),
            ]:
                await forger.publish(where, payload, qos=1)
            await until(lambda: link.status().stored == 1, "the good batch stored")
            await until(lambda: link.status().rejected == 7, "7 rejections")
            assert link.status().rejected_by_reason == {
                "invalid": 4,
                "oversized": 1,
                "unknown_device": 1,
                "device_mismatch": 1,
            }
        assert fleet.count(TelemetryRow) == 1

    asyncio.run(scenario())


def test_desired_state_is_retained_for_a_device_that_connects_later(fleet: Fleet) -> None:
    fleet.enroll(A, B)
    state = DesiredState(device_id=A, version=3, models=[DesiredModel(name="gemma3-270m")])

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            await link.publish_desired(state)
            a = await fleet.connect(stack, A)
            await a.subscribe(topic(A, "desired"), qos=1)
            await a.subscribe(topic(A, "cmd"), qos=1)
            async with asyncio.timeout(DEADLINE_S):
                message = await anext(a.messages)
            assert message.retain
            assert verified(message.payload) == state
            command = Command(device_id=A, id=uid(), kind=CommandKind.REPORT)
            await link.send_command(command)
            async with asyncio.timeout(DEADLINE_S):
                message = await anext(a.messages)
            assert (message.topic.value, message.retain) == (topic(A, "cmd"), False)
            assert Command.model_validate_json(message.payload) == command
            # Cleared (revoked device): a later subscriber gets nothing retained.
            await link.clear_desired(A)
            await link.publish_desired(DesiredState(device_id=B, version=1))
            b = await fleet.connect(stack, B)
            await b.subscribe(topic(B, "desired"), qos=1)
            async with asyncio.timeout(DEADLINE_S):
                assert (await anext(b.messages)).topic.value == topic(B, "desired")
            late = await fleet.connect(stack, A)
            await late.subscribe(topic(A, "desired"), qos=1)
            await late.subscribe(topic(A, "cmd"), qos=1)
            await link.send_command(command)
            async with asyncio.timeout(DEADLINE_S):
                assert (await anext(late.messages)).topic.value == topic(A, "cmd")

    asyncio.run(scenario())


def test_stored_desired_states_are_republished_on_connect(fleet: Fleet) -> None:
    fleet.enroll(A, B)
    state = DesiredState(device_id=A, version=2)
    fleet.update(A, desired=state.model_dump(mode="json"), desired_version=2)
    fleet.update(
        B,
        desired=DesiredState(device_id=B, version=1).model_dump(mode="json"),
        desired_version=1,
        revoked_at=datetime.now(UTC),
    )

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            await up(stack, fleet.link())
            watcher = await fleet.connect(stack, fleet.settings.broker_username)
            await watcher.subscribe("edgefleet/v1/devices/+/desired", qos=1)
            async with asyncio.timeout(DEADLINE_S):
                message = await anext(watcher.messages)
            assert message.topic.value == topic(A, "desired")  # never the revoked B's
            assert verified(message.payload) == state

    asyncio.run(scenario())


def test_a_restarted_controller_keeps_its_state_and_gets_what_it_missed(fleet: Fleet) -> None:
    fleet.enroll(A)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            async with fleet.link() as link:
                async with asyncio.timeout(DEADLINE_S):
                    await link.wait_connected()
                a = await fleet.connect(stack, A)
                await a.publish(
                    topic(A, "reported"), encode(reported(version="2.0")), qos=1, retain=True
                )
                await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
                await until(lambda: link.status().stored == 2, "first batch stored")
            # The controller is away: the broker queues QoS 1 messages for its session.
            await a.publish(topic(A, "telemetry"), encode(telemetry(samples=3)), qos=1)
            fleet.update(A, reported=None, reported_at=None)  # forget, to see it re-read
            async with fleet.link() as link:
                await until(lambda: link.status().stored == 3, "the queued batch")
                await until(
                    lambda: (fleet.device(A).reported or {}).get("agent_version") == "2.0",
                    "the retained reported state re-read",
                )
        assert fleet.count(TelemetryRow) == 5

    asyncio.run(scenario())


def test_the_link_rides_out_a_broker_restart(fleet: Fleet, broker: MosquittoBroker) -> None:
    fleet.enroll(A)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            await asyncio.to_thread(broker.stop)
            await until(lambda: not link.status().connected, "the link notices")
            with pytest.raises(BrokerUnavailable):
                await link.publish_desired(DesiredState(device_id=A, version=1))
            assert link.status().last_error
            await asyncio.to_thread(broker.start)
            await until(lambda: link.status().connected, "the link reconnects")
            a = await fleet.connect(stack, A)
            await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
            await until(lambda: fleet.count(TelemetryRow) == 2, "ingest goes on")
            await link.publish_desired(DesiredState(device_id=A, version=1))

    asyncio.run(scenario())


def test_a_broker_that_is_down_at_start_does_not_stop_the_controller(
    database_url: str, tmp_path: Path
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with make_fleet(database_url, tmp_path, broker_url=dead, manage_broker_auth=False) as fleet:

        async def scenario() -> None:
            async with fleet.link() as link:
                await until(lambda: link.status().last_error, "a connection error")
                status = link.status()
                assert not status.connected
                assert status.broker_url == dead
                with pytest.raises(BrokerUnavailable):
                    await link.send_command(Command(device_id=A, id=uid(), kind=CommandKind.REPORT))

        asyncio.run(scenario())


def test_silent_devices_are_marked_offline(
    database_url: str, tmp_path: Path, broker: MosquittoBroker
) -> None:
    with make_fleet(
        database_url,
        tmp_path,
        broker_url=broker.url,
        broker_auth_dir=broker.auth_dir,
        broker_pid_file=broker.pid_file,
        heartbeat_interval_s=0.2,
    ) as fleet:

        async def scenario() -> None:
            fleet.enroll(A)
            async with AsyncExitStack() as stack:
                await up(stack, fleet.link())
                a = await fleet.connect(stack, A)
                await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
                await until(lambda: fleet.device(A).online, "online")
                await until(lambda: not fleet.device(A).online, "offline after 3 beats")
                offline = Event(device_id=A, id=uid(), kind=EventKind.ONLINE)
                await a.publish(topic(A, "events"), encode(offline), qos=1)
                await until(lambda: fleet.device(A).online, "online again")

        asyncio.run(scenario())


def test_shared_subscriptions_on_mosquitto(fleet: Fleet) -> None:
    fleet.enroll(A)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link(shared_subscription_group="fleet"))
            status = link.status()
            assert (status.protocol, status.shared_subscription) == ("5", True)
            assert status.ingest == "mqtt-shared"
            a = await fleet.connect(stack, A)
            await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
            await until(lambda: link.status().stored == 2, "stored through $share")

    asyncio.run(scenario())


def test_revoking_a_device_cuts_it_off(fleet: Fleet) -> None:
    fleet.enroll(A, B)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            a = await fleet.connect(stack, A)
            await a.subscribe(topic(A, "desired"), qos=1)
            await a.publish(topic(A, "reported"), encode(reported()), qos=1, retain=True)
            await until(lambda: fleet.device(A).reported, "reported stored")
            # What the API does on revocation: mark it, sync the broker, clear its retained.
            fleet.update(A, revoked_at=datetime.now(UTC))
            await link.sync_auth()
            await link.clear_desired(A)
            await disconnected(a)
            with pytest.raises(aiomqtt.MqttError):
                async with fleet.client(A):
                    pass
            watcher = await fleet.connect(stack, fleet.settings.broker_username)
            await watcher.subscribe(topic(A, "reported"), qos=1)
            await watcher.subscribe(topic(A, "desired"), qos=1)
            b = await fleet.connect(stack, B)
            await b.publish(topic(B, "reported"), encode(reported(B)), qos=1, retain=True)
            await watcher.subscribe(topic(B, "reported"), qos=1)
            async with asyncio.timeout(DEADLINE_S):
                first = await anext(watcher.messages)
            assert first.topic.value == topic(B, "reported")  # nothing of A's is retained
            assert link.status().rejected == 0

    asyncio.run(scenario())


def test_a_device_enrolled_by_another_replica_is_found_on_its_first_message(
    fleet: Fleet,
) -> None:
    fleet.enroll(A)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            fleet.enroll(B)  # no sync_auth here: the link's device cache does not know B
            forger = await fleet.connect(stack, fleet.settings.broker_username)
            await forger.publish(topic(B, "telemetry"), encode(telemetry(B)), qos=1)
            await until(lambda: link.status().stored == 2, "stored after a re-read")
            assert link.status().rejected == 0

    asyncio.run(scenario())


def test_old_telemetry_is_pruned_at_start(fleet: Fleet) -> None:
    fleet.enroll(A)
    old = datetime.now(UTC) - timedelta(days=fleet.settings.retention_days + 1)
    with Session(fleet.engine) as session:
        for ts in (old, datetime.now(UTC)):
            session.add(
                TelemetryRow(
                    device_id=A,
                    sample_id=uid(),
                    seq=0,
                    ts=ts,
                    window_s=5,
                    requests=0,
                    errors=0,
                    rejections=0,
                    sent_at=ts,
                    stored_at=ts,
                )
            )
        session.commit()

    async def scenario() -> None:
        async with fleet.link():
            await until(lambda: fleet.count(TelemetryRow) == 1, "the old sample pruned")

    asyncio.run(scenario())


# --- the embedded broker ----------------------------------------------------------------


@pytest.fixture
def embedded_fleet(database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    with make_fleet(database_url, tmp_path, embedded_broker_port=free_port()) as built:
        yield built


def link_tasks() -> set[str]:
    """The link's background tasks still running, by name (edgefleet-link-<job>)."""
    names = {t.get_name() for t in asyncio.all_tasks()}
    return {
        name.removeprefix("edgefleet-link-") for name in names if name.startswith("edgefleet-link-")
    }


def test_a_start_that_fails_stops_what_had_started(embedded_fleet: Fleet) -> None:
    """The embedded broker's port is taken: the link's entry fails and leaves no task behind."""
    fleet = embedded_fleet
    fleet.enroll(A)

    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", fleet.settings.embedded_broker_port))
            taken.listen()
            link = fleet.link()
            with pytest.raises(ConfigError, match="cannot start the embedded MQTT broker"):
                await link.__aenter__()
        assert link_tasks() == set()
        assert (fleet.settings.resolved_auth_dir / "passwd").is_file()  # auth was synced first

    asyncio.run(scenario())


@pytest.mark.integration  # starts the embedded broker
def test_leaving_the_link_stops_every_task_it_started(embedded_fleet: Fleet) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            await up(stack, embedded_fleet.link())
            jobs = {"directory", "flusher", "presence", "retention", "session"}
            assert jobs <= link_tasks()
        assert link_tasks() == set()

    asyncio.run(scenario())


@pytest.mark.integration  # starts the embedded broker
def test_the_embedded_broker_end_to_end(embedded_fleet: Fleet) -> None:
    fleet = embedded_fleet
    fleet.enroll(A, B)
    port = fleet.settings.embedded_broker_port

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link(shared_subscription_group="fleet"))
            status = link.status()
            assert status.embedded_broker
            assert (status.protocol, status.shared_subscription) == ("3.1.1", False)
            assert status.broker_url == f"mqtt://127.0.0.1:{port}"
            await link.publish_desired(DesiredState(device_id=A, version=1))
            a = await fleet.connect(stack, A, port=port)
            await a.subscribe(topic(A, "desired"), qos=1)
            async with asyncio.timeout(DEADLINE_S):
                assert (await anext(a.messages)).retain
            await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
            await a.publish(topic(B, "telemetry"), encode(telemetry(B)), qos=1)  # refused
            await until(lambda: link.status().stored == 2, "stored")
            fleet.update(A, revoked_at=datetime.now(UTC))
            await link.sync_auth()
            await link.clear_desired(A)
            await disconnected(a)
            with pytest.raises(aiomqtt.MqttError):
                async with fleet.client(A, port=port):
                    pass
        assert fleet.count(TelemetryRow) == 2

    asyncio.run(scenario())


@pytest.mark.integration  # starts the embedded broker
def test_an_mqtt_311_only_broker_gets_plain_subscriptions(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    auth = tmp_path / "auth"
    with make_fleet(
        database_url,
        tmp_path,
        broker_url=f"mqtt://127.0.0.1:{port}",
        broker_auth_dir=auth,
        shared_subscription_group="fleet",
    ) as fleet:

        async def scenario() -> None:
            fleet.enroll(A)
            async with AsyncExitStack() as stack:
                link = await stack.enter_async_context(fleet.link())  # writes the files
                await stack.enter_async_context(
                    EmbeddedBroker(
                        host="127.0.0.1",
                        port=port,
                        password_file=auth / "passwd",
                        controller_username=fleet.settings.broker_username,
                    )
                )
                async with asyncio.timeout(DEADLINE_S):
                    await link.wait_connected()
                status = link.status()
                assert (status.protocol, status.shared_subscription) == ("3.1.1", False)
                a = await fleet.connect(stack, A)
                await a.publish(topic(A, "telemetry"), encode(telemetry()), qos=1)
                await until(lambda: link.status().stored == 2, "stored")

        asyncio.run(scenario())


# --- acknowledgements -----------------------------------------------------------------------


class FakePaho:
    """paho's side of a fake connection: the PUBACKs the session sends."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    def ack(self, mid: int, qos: int) -> int:
        self.acked.append((mid, qos))
        return 0


class FakeConnection:
    """Just enough of an ``aiomqtt.Client`` for ``MqttSession._run``: messages, then a hang-up."""

    def __init__(self, messages: list[SimpleNamespace]) -> None:
        self._client = FakePaho()
        self._queue = messages
        self.hang_up = asyncio.Event()
        self.delivered = asyncio.Event()
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        self.subscribed.extend(f for f, _ in filters)
        return [1 for _ in filters]

    async def unsubscribe(self, filters: list[str]) -> None:
        self.unsubscribed.extend(filters)

    @property
    def messages(self) -> AsyncIterator[SimpleNamespace]:
        async def stream() -> AsyncIterator[SimpleNamespace]:
            for message in self._queue:
                yield message
            self.delivered.set()
            await self.hang_up.wait()

        return stream()


def message(mid: int, qos: int = 1, *, retain: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        topic=SimpleNamespace(value=topic(A, "events")),
        payload=b"{}",
        retain=retain,
        qos=qos,
        mid=mid,
    )


def test_the_session_acknowledges_a_message_only_once_ingest_settles_it(tmp_path: Path) -> None:
    """No PUBACK when ``on_message`` returns: only once the message is settled, in order."""
    settles: dict[int, Settle | None] = {}

    def on_message(_topic: str, _payload: Any, _retained: bool, settle: Settle | None) -> None:
        settles[len(settles) + 1] = settle

    async def nothing() -> None:
        return None

    connection = FakeConnection(
        [message(1), message(2, retain=True), message(3, qos=0), message(4), message(5)]
    )
    session = MqttSession(
        FleetSettings(data_dir=tmp_path / "data"),
        broker_url="mqtt://broker.test:1883",
        password="x",
        mqtt5=False,
        reconnect=ReconnectPolicy(),
        on_message=on_message,
        on_connect=nothing,
        warn=RateLimitedLog(logging.getLogger(__name__), 10),
    )

    async def scenario() -> None:
        run = asyncio.create_task(session._run(connection))  # type: ignore[arg-type]
        await in_time(connection.delivered.wait(), "every message handed to ingest")
        acked = connection._client.acked
        assert acked == []  # handed in, buffered at most: not stored
        assert settles[2] is None  # retained: sent again on every subscribe
        assert settles[3] is None  # QoS 0: no acknowledgement at all
        settle_1, settle_4, settle_5 = settles[1], settles[4], settles[5]
        assert settle_1 is not None
        assert settle_4 is not None
        assert settle_5 is not None
        settle_4()
        assert acked == []  # message 1 came first: its PUBACK goes first
        settle_1()
        assert acked == [(1, 1), (2, 1), (4, 1)]  # the retained copy's was owed since it came
        connection.hang_up.set()
        await in_time(run, "the session's run to end")
        settle_5()  # stored after the connection was lost: the broker sends it again
        assert acked == [(1, 1), (2, 1), (4, 1)]

    asyncio.run(scenario())


def test_with_jetstream_ingest_the_session_drops_its_ingest_subscriptions(tmp_path: Path) -> None:
    """Device messages come through JetStream: an old persistent session would double them."""
    connection = FakeConnection([])
    settings = FleetSettings(data_dir=tmp_path / "data", nats_ingest_url="nats://nats.test:4222")

    async def nothing() -> None:
        return None

    session = MqttSession(
        settings,
        broker_url="mqtt://broker.test:1883",
        password="x",
        mqtt5=False,
        reconnect=ReconnectPolicy(),
        on_message=lambda *_: None,
        on_connect=nothing,
        warn=RateLimitedLog(logging.getLogger(__name__), 10),
        ingest=False,
    )
    asyncio.run(session._subscribe(connection))  # type: ignore[arg-type]
    assert connection.subscribed == []
    assert sorted(connection.unsubscribed) == sorted(
        topic("+", channel) for channel in ("reported", "telemetry", "events")
    )


class RecordedWrites:
    """Stands in for writing the broker's users: records which devices each write held."""

    def __init__(self) -> None:
        self.writes: list[set[str]] = []

    def __call__(
        self, _settings: FleetSettings, _hash: str, credentials: list[DeviceCredential]
    ) -> AuthFiles:
        self.writes.append({credential.device_id for credential in credentials})
        return AuthFiles((), len(credentials), reloaded=False)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordedWrites:
    writes = RecordedWrites()
    monkeypatch.setattr(device_link, "write_auth_files", writes)
    return writes


def test_a_burst_of_auth_syncs_shares_one_rewrite(tmp_path: Path, recorded: RecordedWrites) -> None:
    """The broker reloads every user at each rewrite: ten enrollments at once cost two."""
    with make_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path) as fleet:
        fleet.enroll(*(f"dev-{n:03}" for n in range(10)))
        link = fleet.link()

        async def scenario() -> None:
            # The first runs at once; the nine that come while it runs share the next.
            await asyncio.gather(*(link.sync_auth() for _ in range(10)))
            assert len(recorded.writes) == 2
            await link.sync_auth()  # a call after the burst writes again
            assert len(recorded.writes) == 3

        asyncio.run(scenario())


def test_each_auth_sync_returns_after_a_write_holding_its_device(
    tmp_path: Path, recorded: RecordedWrites
) -> None:
    """Enrollment answers after sync_auth: the device must be able to log in by then."""
    with make_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path) as fleet:
        link = fleet.link()

        async def enroll_and_sync(device: str) -> None:
            await asyncio.to_thread(fleet.enroll, device)
            await link.sync_auth()
            assert device in recorded.writes[-1]

        async def scenario() -> None:
            await asyncio.gather(*(enroll_and_sync(f"dev-{n:03}") for n in range(12)))

        asyncio.run(scenario())


def test_a_replica_that_read_the_devices_earlier_never_writes_the_users_last(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas share the users file: a's sync read before dev-late enrolled through b."""
    a_has_read, b_wrote = threading.Event(), threading.Event()
    writes: list[set[str]] = []

    def write(
        _settings: FleetSettings, _hash: str, credentials: list[DeviceCredential]
    ) -> AuthFiles:
        if not writes and not a_has_read.is_set():  # a's write, from what it read
            a_has_read.set()
            b_wrote.wait(timeout=2)  # b writes meanwhile, unless it must wait its turn
        else:
            b_wrote.set()
        writes.append({credential.device_id for credential in credentials})
        return AuthFiles((), len(credentials), reloaded=False)

    monkeypatch.setattr(device_link, "write_auth_files", write)
    with make_fleet(postgres_url, tmp_path) as fleet:
        a, b = fleet.link(), fleet.link()

        async def scenario() -> None:
            first = asyncio.create_task(a.sync_auth())
            assert await asyncio.to_thread(a_has_read.wait, 30)
            await asyncio.to_thread(fleet.enroll, "dev-late")
            await b.sync_auth()
            await first

        asyncio.run(scenario())
    assert writes == [set(), {"dev-late"}]


# --- the database going away ------------------------------------------------------------


def test_a_locked_database_delays_ingest_but_loses_nothing(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    path = tmp_path / "fleet.db"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    SQLModel.metadata.create_all(engine)
    settings = FleetSettings(
        data_dir=tmp_path / "data",
        broker_url=broker.url,
        broker_auth_dir=broker.auth_dir,
        broker_pid_file=broker.pid_file,
        ingest_flush_ms=20,
    )
    fleet = Fleet(engine, settings)
    fleet.enroll(A)

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            link = await up(stack, fleet.link())
            a = await fleet.connect(stack, A)
            blocker = sqlite3.connect(path, isolation_level=None)
            try:
                blocker.execute("BEGIN EXCLUSIVE")
                await a.publish(topic(A, "telemetry"), encode(telemetry(samples=4)), qos=1)
                await until(lambda: link.status().db_retries >= 2, "retries")
                assert link.status().stored == 0
                assert link.status().backlog == 1
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            await until(lambda: link.status().stored == 4, "stored after the lock")

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


@pytest.mark.integration  # runs a Python child process
def test_importing_the_port_loads_no_mqtt_stack() -> None:
    """The API imports fleet.link.port; aiomqtt and amqtt load only with DeviceLink."""
    code = (
        "import sys, fleet.link.port, fleet.link; "
        "print(sorted(m for m in ('aiomqtt', 'amqtt', 'paho') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert loaded.strip() == "[]"


def test_the_public_api_is_what_we_meant() -> None:
    import fleet.link

    assert fleet.link.__all__ == [
        "Access",
        "DeviceLink",
        "LinkPort",
        "LinkStats",
        "LinkStatus",
        "ReconnectPolicy",
        "acl_allows",
    ]
    for name in fleet.link.__all__:
        assert getattr(fleet.link, name) is not None
