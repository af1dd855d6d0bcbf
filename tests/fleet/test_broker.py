"""The ACL on real brokers, with real clients: Mosquitto, and the embedded amqtt broker.

Every test runs against both brokers, configured the way the controller configures
them: the same password file, the same rules (Mosquitto from the rendered acl_file,
the embedded broker from fleet.link.acl directly). Every test starts a broker, so the
module is integration (the ``broker`` fixture is reached through ``getfixturevalue``,
which the suite's marking hook cannot see, and the embedded broker is no fixture).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from fleet.config import FleetSettings
from fleet.link.broker_auth import PASSWORD_FILE, DeviceCredential, write_auth_files
from fleet.link.embedded import EmbeddedBroker
from fleet.link.passwords import hash_password
from scripts.servers import MosquittoBroker, free_port
from tests.polling import eventually

pytestmark = pytest.mark.integration

CTL = "edgefleet-controller"
A = "dev-aaa"
B = "dev-bbb"
PASSWORDS = {CTL: "ctl-secret", A: "a-secret", B: "b-secret"}
DEADLINE_S = 10.0


def topic(device: str, channel: str) -> str:
    return f"edgefleet/v1/devices/{device}/{channel}"


@dataclass
class BrokerUnderTest:
    """One broker, its auth files, and a way to change who may log in."""

    kind: str
    settings: FleetSettings
    port: int
    mosquitto: MosquittoBroker | None = None
    embedded: EmbeddedBroker | None = None
    revoked: set[str] = field(default_factory=set)
    _ctl_hash: str = field(default_factory=lambda: hash_password(PASSWORDS[CTL]))

    def write_files(self) -> None:
        write_auth_files(
            self.settings,
            self._ctl_hash,
            [
                DeviceCredential(device, hash_password(PASSWORDS[device]), device in self.revoked)
                for device in (A, B)
            ],
        )

    async def revoke(self, device: str) -> None:
        self.revoked.add(device)
        self.write_files()
        if self.embedded is not None:
            await self.embedded.disconnect_unauthorized()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BrokerUnderTest]:
        self.write_files()
        if self.mosquitto is not None:
            await wait_until_login_works(self.port, CTL)
            yield self
            return
        self.embedded = EmbeddedBroker(
            host="127.0.0.1",
            port=self.port,
            password_file=self.settings.resolved_auth_dir / PASSWORD_FILE,
            controller_username=CTL,
        )
        async with self.embedded:
            yield self


@pytest.fixture(params=["mosquitto", "embedded"])
def mqtt(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    if request.param == "mosquitto":
        broker: MosquittoBroker = request.getfixturevalue("broker")
        settings = FleetSettings(
            data_dir=tmp_path / "data",
            broker_url=broker.url,
            broker_auth_dir=broker.auth_dir,
            broker_pid_file=broker.pid_file,
        )
        yield BrokerUnderTest("mosquitto", settings, broker.port, mosquitto=broker)
    else:
        settings = FleetSettings(data_dir=tmp_path / "data")
        yield BrokerUnderTest("embedded", settings, free_port())


def client(port: int, user: str, **options: object) -> aiomqtt.Client:
    # Devices connect with their id as client id, as enrollment tells them to.
    options.setdefault("identifier", user if user != CTL else f"ctl-{time.monotonic_ns()}")
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=PASSWORDS[user],
        timeout=5,
        **options,  # type: ignore[arg-type]
    )


async def wait_until_login_works(port: int, user: str) -> None:
    """Mosquitto reloads its files on SIGHUP, asynchronously: poll with a deadline."""

    async def logs_in() -> bool:
        async with client(port, user):
            return True

    await eventually(
        logs_in,
        f"{user} to log in (Mosquitto reloading its files)",
        within_s=DEADLINE_S,
        every_s=0.05,
        ignoring=(aiomqtt.MqttError,),
    )


async def next_message(
    messages: aiomqtt.MessagesIterator, within: float = DEADLINE_S
) -> aiomqtt.Message:
    async with asyncio.timeout(within):
        return await anext(messages)


async def collect_until(
    messages: aiomqtt.MessagesIterator, done: Callable[[aiomqtt.Message], bool]
) -> list[aiomqtt.Message]:
    got = []
    async with asyncio.timeout(DEADLINE_S):
        async for message in messages:
            got.append(message)
            if done(message):
                return got
    raise AssertionError("unreachable")


def failed(codes: object) -> bool:
    return all(getattr(code, "value", code) >= 0x80 for code in codes)  # type: ignore[attr-defined]


def test_a_device_cannot_publish_as_another(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL) as ctl:
            await ctl.subscribe("edgefleet/v1/devices/+/+", qos=1)
            async with client(mqtt.port, A) as a:
                for channel in ("telemetry", "events", "reported"):
                    await a.publish(topic(B, channel), b"forged", qos=1)
                await a.publish(topic(A, "desired"), b"forged", qos=1)  # not upstream
                await a.publish("elsewhere/topic", b"forged", qos=1)
                await a.publish(topic(A, "telemetry"), b"mine", qos=1)
            got = await collect_until(ctl.messages, lambda m: m.payload == b"mine")
            assert [(m.topic.value, m.payload) for m in got] == [(topic(A, "telemetry"), b"mine")]

    asyncio.run(scenario())


def test_a_device_cannot_read_another_devices_desired_state(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL) as ctl:
            await ctl.publish(topic(B, "desired"), b"for-b", qos=1, retain=True)
            await ctl.publish(topic(A, "desired"), b"for-a", qos=1, retain=True)
            async with client(mqtt.port, A) as a:
                for pattern in (topic(B, "desired"), "#", "edgefleet/v1/devices/+/desired"):
                    codes = await a.subscribe(pattern, qos=1)
                    # amqtt refuses the subscription; Mosquitto 2.0 grants it and then
                    # delivers nothing the ACL does not let the device read.
                    assert failed(codes) or mqtt.kind == "mosquitto", pattern
                await ctl.publish(topic(B, "cmd"), b"cmd-for-b", qos=1)
                await ctl.publish(topic(B, "desired"), b"for-b-2", qos=1, retain=True)
                assert not failed(await a.subscribe(topic(A, "desired"), qos=1))
                assert not failed(await a.subscribe(topic(A, "cmd"), qos=1))
                await ctl.publish(topic(A, "cmd"), b"last", qos=1)
                got = await collect_until(a.messages, lambda m: m.payload == b"last")
                assert {m.topic.value for m in got} <= {topic(A, "desired"), topic(A, "cmd")}
                assert b"for-a" in [m.payload for m in got]

    asyncio.run(scenario())


def test_a_connecting_device_gets_no_one_elses_retained_messages(mqtt: BrokerUnderTest) -> None:
    # amqtt 0.12 hands a new client the retained messages of every subscription on the
    # broker; the embedded broker must not.
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL) as ctl:
            await ctl.subscribe("edgefleet/v1/devices/+/reported", qos=1)
            async with client(mqtt.port, A, identifier=A) as a:
                await a.subscribe(topic(A, "desired"), qos=1)
                await ctl.publish(topic(A, "desired"), b"secret-a", qos=1, retain=True)
                assert (await next_message(a.messages)).payload == b"secret-a"
                await a.publish(topic(A, "reported"), b"a-state", qos=1, retain=True)
                assert (await next_message(ctl.messages)).payload == b"a-state"
                async with client(mqtt.port, B, identifier=B, clean_session=False) as b:
                    await b.subscribe(topic(B, "desired"), qos=1)
                    await ctl.publish(topic(B, "desired"), b"for-b", qos=1, retain=True)
                    message = await next_message(b.messages)
                    assert (message.topic.value, message.payload) == (topic(B, "desired"), b"for-b")

    asyncio.run(scenario())


def test_a_revoked_device_is_cut_off_and_cannot_come_back(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, A) as a:
            await a.subscribe(topic(A, "desired"), qos=1)
            await mqtt.revoke(A)
            with pytest.raises(aiomqtt.MqttError):
                await next_message(a.messages)  # the broker drops the connection
            with pytest.raises(aiomqtt.MqttError):
                async with client(mqtt.port, A):
                    pass
            async with client(mqtt.port, B):
                pass  # the others are untouched

    asyncio.run(scenario())


def test_wrong_or_missing_credentials_are_refused(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running():
            for username, password in ((A, "wrong"), ("nobody", "x"), (A, "")):
                with pytest.raises(aiomqtt.MqttError):
                    async with aiomqtt.Client(
                        "127.0.0.1", mqtt.port, username=username, password=password, timeout=5
                    ):
                        pass
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client("127.0.0.1", mqtt.port, timeout=5):
                    pass

    asyncio.run(scenario())


# --- raw MQTT 3.1.1, for what client libraries will not do ---------------------------------


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    username: str,
    password: str,
    *,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
    level: int = 4,
) -> bytes:
    flags = 0xC0 | (0x02 if clean else 0)
    if will is not None:
        flags |= 0x04 | 0x08  # will flag, will QoS 1
    header = _string(b"MQTT") + bytes([level, flags]) + (30).to_bytes(2, "big")
    if level == 5:
        header += b"\x00"  # no properties
    payload = _string(client_id.encode())
    if will is not None:
        if level == 5:
            payload += b"\x00"
        payload += _string(will[0].encode()) + _string(will[1])
    payload += _string(username.encode()) + _string(password.encode())
    body = header + payload
    return b"\x10" + _remaining_length(len(body)) + body


def raw_connect(port: int, packet: bytes) -> tuple[socket.socket, int]:
    """Send a CONNECT; the open socket and the CONNACK's return code (-1: none came)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(packet)
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            return sock, -1
        connack += chunk
    assert connack[0] == 0x20, connack
    return sock, connack[3]


def test_a_last_will_on_another_devices_topic_never_arrives(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL) as ctl:
            await ctl.subscribe("edgefleet/v1/devices/+/events", qos=1)
            forged = connect_packet(A, A, PASSWORDS[A], will=(topic(B, "events"), b"forged"))
            honest = connect_packet(A, A, PASSWORDS[A], will=(topic(A, "events"), b"gone"))
            for packet in (forged, honest):
                sock, _code = await asyncio.to_thread(raw_connect, mqtt.port, packet)
                sock.close()  # no DISCONNECT: the broker sends the will, if it took it
            got = await collect_until(ctl.messages, lambda m: m.payload == b"gone")
            assert [(m.topic.value, m.payload) for m in got] == [(topic(A, "events"), b"gone")]

    asyncio.run(scenario())


def test_no_one_can_knock_the_controller_off_with_its_client_id(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL, identifier="ctl") as ctl:
            await ctl.subscribe("edgefleet/v1/devices/+/telemetry", qos=1)
            impostor = connect_packet("ctl", CTL, "wrong-password", clean=True)
            sock, code = await asyncio.to_thread(raw_connect, mqtt.port, impostor)
            sock.close()
            assert code != 0
            async with client(mqtt.port, A) as a:
                await a.publish(topic(A, "telemetry"), b"still-here", qos=1)
            assert (await next_message(ctl.messages)).payload == b"still-here"

    asyncio.run(scenario())


def test_persistent_sessions_keep_qos1_messages_while_away(mqtt: BrokerUnderTest) -> None:
    async def scenario() -> None:
        async with mqtt.running():
            async with client(mqtt.port, CTL, identifier="ctl", clean_session=False) as ctl:
                await ctl.subscribe("edgefleet/v1/devices/+/telemetry", qos=1)
            async with client(mqtt.port, A) as a:
                await a.publish(topic(A, "telemetry"), b"while-away", qos=1)
            async with client(mqtt.port, CTL, identifier="ctl", clean_session=False) as ctl:
                assert (await next_message(ctl.messages)).payload == b"while-away"

    asyncio.run(scenario())


def test_the_embedded_broker_refuses_mqtt5_at_once(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path)
    target = BrokerUnderTest("embedded", settings, free_port())

    async def scenario() -> None:
        async with target.running():
            started = time.monotonic()
            with pytest.raises(aiomqtt.MqttCodeError) as refused:
                async with client(target.port, CTL, protocol=aiomqtt.ProtocolVersion.V5):
                    pass
            assert getattr(refused.value.rc, "value", None) == 0x84  # unsupported version
            assert time.monotonic() - started < 2
            # A client that never finishes its CONNECT does not hold the broker up.
            sock = socket.create_connection(("127.0.0.1", target.port))
            sock.sendall(b"\x10\x7f")
            sock.close()

    asyncio.run(scenario())


def test_qos1_messages_arrive_even_when_the_sender_leaves_at_once(mqtt: BrokerUnderTest) -> None:
    # amqtt acknowledges a PUBLISH before it forwards it, and used to drop what it had
    # not forwarded yet when the sender disconnected (an agent's last event on shutdown).
    count = 300

    async def scenario() -> None:
        async with mqtt.running(), client(mqtt.port, CTL) as ctl:
            await ctl.subscribe(topic(A, "events"), qos=1)
            async with client(mqtt.port, A) as a:
                await asyncio.gather(
                    *(a.publish(topic(A, "events"), str(i).encode(), qos=1) for i in range(count))
                )
            got = await collect_until(ctl.messages, lambda m: m.payload == str(count - 1).encode())
            assert sorted(int(m.payload) for m in got) == list(range(count))

    asyncio.run(scenario())


def test_on_mosquittos_device_listener_no_device_can_take_anothers_client_id(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # The device-facing listener sets use_username_as_clientid: A's forged client id is
    # replaced by A's username, so B's session survives (docs/broker.md).
    settings = FleetSettings(
        data_dir=tmp_path / "data",
        broker_url=broker.url,
        broker_auth_dir=broker.auth_dir,
        broker_pid_file=broker.pid_file,
    )
    target = BrokerUnderTest("mosquitto", settings, broker.port, mosquitto=broker)

    async def scenario() -> None:
        async with target.running(), client(broker.device_port, B) as b:
            await b.subscribe(topic(B, "desired"), qos=1)
            async with client(broker.device_port, A, identifier=B) as a:
                await a.publish(topic(A, "telemetry"), b"from-a", qos=1)
            async with client(broker.port, CTL) as ctl:
                await ctl.publish(topic(B, "desired"), b"still-b", qos=1)
            assert (await next_message(b.messages)).payload == b"still-b"

    asyncio.run(scenario())


def test_the_embedded_broker_holds_devices_to_their_own_client_id(tmp_path: Path) -> None:
    target = BrokerUnderTest("embedded", FleetSettings(data_dir=tmp_path), free_port())

    async def scenario() -> None:
        async with target.running(), client(target.port, B) as b:
            await b.subscribe(topic(B, "desired"), qos=1)
            with pytest.raises(aiomqtt.MqttError):
                async with client(target.port, A, identifier=B):
                    pass
            async with client(target.port, CTL) as ctl:
                await ctl.publish(topic(B, "desired"), b"still-b", qos=1)
            assert (await next_message(b.messages)).payload == b"still-b"

    asyncio.run(scenario())
