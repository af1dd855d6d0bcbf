"""The MQTT session: connect, subscribe, receive, send from the spool, report; reconnect.

One :class:`MqttSession` owns the device's relationship with the broker for the
agent's whole life. Each connection is an aiomqtt client (MQTT 3.1.1, which both
Mosquitto and the controller's embedded amqtt broker speak) authenticated with the
identity's credentials, with a last will (an OFFLINE event, QoS 1, not retained) on
the device's ``events`` topic. While connected, three tasks run together:

- the *receiver* hands ``desired`` payloads on unparsed (they are signed; the link
  verifies them, :mod:`models.director`) and parses ``cmd`` messages; a bad command
  or a foreign device's topic is logged and ignored;
- the *sender* publishes the spool's head in order and deletes each entry only
  after the broker's PUBACK (aiomqtt's ``publish(qos=1)`` returns on the PUBACK);
- the *reporter* publishes the reported state (retained) when it differs from the
  last one the broker acknowledged, and when the controller asks (REPORT).

If any of them fails the connection is dropped and retried with exponential backoff
and full jitter, reset once a connection stays up ``healthy_after_s``. A broker that
keeps refusing the credentials (three times in a row: a revoked device, not a broker
reloading its password file) gets a long backoff instead.

Clean session: yes (``clean_session=True``). The device only needs its retained
desired state, which the broker sends on every subscribe, and commands while it is
connected: a persistent session would make the broker queue commands for an offline
device and replay them later, which the ``cmd`` channel's policy rules out, and would
cost broker memory per device. Outbound durability is the spool's job, not the
broker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt
from pydantic import ValidationError

from agent.backoff import Backoff, Retry, seconds
from agent.errors import ConfigError
from agent.link.identity import Identity
from agent.link.spool import Drops, Entry, EntryKind, Spool
from agent.state.report import agent_version, report_key
from models.topics import Channel, DeviceTopic, TopicError
from models.wire import (
    MAX_PAYLOAD_BYTES,
    MAX_SAMPLES_PER_BATCH,
    Command,
    Event,
    EventKind,
    ReportedState,
    Severity,
    TelemetryBatch,
    TelemetrySample,
    WireError,
    decode,
    encode,
    utc_now,
)

__all__ = [
    "BrokerAddress",
    "Host",
    "MqttSession",
    "SessionStatus",
    "is_auth_failure",
    "load_broker_ca",
    "new_event",
    "parse_broker_url",
    "tls_context",
]

log = logging.getLogger(__name__)

_BATCH_BYTES = MAX_PAYLOAD_BYTES - 16 * 1024  # room for the batch's own fields
_REPORT_CHECK_S = 5.0  # look for report changes at least this often (seconds)
_REPORT_MIN_GAP_S = 0.5  # and publish reports at most this often (seconds)
_OFFLINE_TIMEOUT_S = 2.0  # a clean shutdown waits this long for the OFFLINE ack
_AUTH_CODES = frozenset({4, 5, 134, 135})  # MQTT 3.1.1 and 5 "bad credentials"/"not authorized"
_AUTH_STRIKES = 3  # consecutive refusals before the long backoff (a broker reloading its
# password file, or shutting down, may refuse a login or two that is valid)


class Host(Protocol):
    """What the link needs from the agent: the desired state's executor and its report."""

    @property
    def desired_version(self) -> int | None: ...

    def report(self, device_id: str) -> ReportedState: ...


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, from the identity's ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; :class:`ConfigError` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ConfigError(f"broker url {url!r} is not mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker url {url!r} has an invalid port") from None
    return BrokerAddress(parts.hostname, port, tls)


def load_broker_ca(path: Path) -> str:
    """The provisioned broker CA (PEM); :class:`ConfigError` if it cannot be used.

    Checked when the link starts, so a bad file is reported once, not on every reconnect.
    """
    try:
        pem = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the broker CA {path}: {exc}") from None
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"the broker CA {path} is not a PEM certificate: {exc}") from None
    return pem


def tls_context(
    address: BrokerAddress, provisioned_ca: str | None, enrolled_ca: str | None
) -> ssl.SSLContext | None:
    """How to verify the broker: None for mqtt://; for mqtts://, one CA, else the system's.

    A CA provisioned with the image beats the one the enrollment response carried: a
    trust anchor from provisioning is not trusted on first use over the network.
    """
    if not address.tls:
        return None
    ca = provisioned_ca or enrolled_ca
    return ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()


def is_auth_failure(exc: BaseException) -> bool:
    """True when the broker refused our credentials (CONNACK 4/5, or MQTT 5's 134/135)."""
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    code = getattr(exc.rc, "value", exc.rc)
    return isinstance(code, int) and code in _AUTH_CODES


def new_event(
    device_id: str,
    kind: EventKind,
    message: str = "",
    *,
    severity: Severity = Severity.INFO,
    data: dict[str, Any] | None = None,
) -> Event:
    return Event(
        device_id=device_id,
        id=uuid.uuid4().hex,
        kind=kind,
        severity=severity,
        message=message[:2000],
        data=data or {},
    )


@dataclass
class SessionStatus:
    """What /v1/fleet shows about the broker connection; the session keeps it current."""

    state: str = "starting"  # connecting, connected, backoff, auth_failed, stopped, error
    connected: bool = False
    last_error: str | None = None
    last_connected_at: datetime | None = None
    last_report_at: datetime | None = None
    next_attempt_in_s: float | None = None
    received_desired_version: int | None = None


class _Stopped(Exception):
    """The link is shutting down: leave the connection cleanly."""


class MqttSession:
    """The device's broker connection, kept up (with backoff) until :meth:`stop`."""

    def __init__(
        self,
        identity: Identity,
        spool: Spool,
        host: Host,
        *,
        on_desired: Callable[[bytes], None],
        on_command: Callable[[Command], None],
        newest_desired: Callable[[], int | None],
        backoff: Backoff,
        auth_backoff_s: float = 600.0,
        healthy_after_s: float = 30.0,
        publish_timeout_s: float = 15.0,
        rand: Callable[[], float] = random.random,
        broker_ca: str | None = None,
        on_trouble: Callable[[str], None] | None = None,
    ) -> None:
        self.identity = identity
        self._broker_ca = broker_ca  # provisioned; wins over the identity's ca_pem
        self._on_trouble = on_trouble  # told why a connection failed, and when it retries
        self.device_id = identity.device_id
        self.spool = spool
        self.host = host
        self.status = SessionStatus()
        self._on_desired = on_desired
        self._on_command = on_command
        self._newest_desired = newest_desired
        self._retry = Retry(backoff, rand)
        self._auth_refusals = 0  # consecutive logins the broker refused
        self._rand = rand
        self._auth_backoff_s = auth_backoff_s
        self._healthy_after_s = healthy_after_s
        self._publish_timeout_s = publish_timeout_s
        self._topics = {c: str(DeviceTopic(self.device_id, c)) for c in Channel}
        self._outbox = asyncio.Event()  # the spool has something new
        self._report_due = asyncio.Event()  # the reported state may have changed
        self._report_forced = False  # publish even if unchanged (REPORT command)
        self._acked_report: str | None = None  # report_key of the last acknowledged report
        self._stop = asyncio.Event()

    # -- signals from the rest of the link ------------------------------------------

    def wake_sender(self) -> None:
        self._outbox.set()

    def report_changed(self, *, force: bool = False) -> None:
        self._report_forced = self._report_forced or force
        self._report_due.set()

    def stop(self) -> None:
        self._stop.set()

    # -- connection loop ------------------------------------------------------------

    def _client(self, address: BrokerAddress) -> aiomqtt.Client:
        broker = self.identity.broker
        will = new_event(self.device_id, EventKind.OFFLINE, "connection lost")
        tls = tls_context(address, self._broker_ca, broker.ca_pem)
        keepalive = int(min(max(self.identity.heartbeat_interval_s, 5.0), 600.0))
        return aiomqtt.Client(
            address.host,
            address.port,
            username=broker.username,
            password=broker.password,
            identifier=broker.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self._topics[Channel.EVENTS], encode(will), qos=1, retain=False),
            clean_session=True,
            keepalive=keepalive,
            timeout=self._publish_timeout_s,
            tls_context=tls,
            max_queued_incoming_messages=1000,
        )

    async def run(self) -> None:
        """Stay connected until :meth:`stop`; never raises for broker trouble."""
        try:
            address = parse_broker_url(self.identity.broker.url)
        except ConfigError as exc:
            self.status.state, self.status.last_error = "error", exc.message
            log.error("fleet link disabled: %s", exc.message)
            return
        while not self._stop.is_set():
            self.status.state, self.status.next_attempt_in_s = "connecting", None
            connected_at: float | None = None
            try:
                async with self._client(address) as client:
                    connected_at = time.monotonic()
                    self._auth_refusals = 0
                    await self._connected(client)
            except _Stopped:
                break
            except aiomqtt.MqttError as exc:
                delay = self._after_failure(exc, connected_at)
            except Exception as exc:  # a bug must not end the link: log it and retry
                log.exception("fleet link: unexpected error in the MQTT session")
                delay = self._after_failure(exc, connected_at)
            finally:
                self.status.connected = False
            if await self._sleep(delay):
                break
        self.status.state = "stopped"

    def _after_failure(self, exc: BaseException, connected_at: float | None) -> float:
        if connected_at is not None and time.monotonic() - connected_at >= self._healthy_after_s:
            self._retry.reset()
        self.status.last_error = str(exc) or type(exc).__name__
        self._auth_refusals = self._auth_refusals + 1 if is_auth_failure(exc) else 0
        if self._auth_refusals >= _AUTH_STRIKES:
            delay = self._auth_backoff_s * (0.5 + 0.5 * self._rand())
            self.status.state = "auth_failed"
            log.error(
                "the broker refused device %s's credentials (%s): the device may have been "
                "revoked; serving locally, next attempt in %.0f s",
                self.device_id,
                exc,
                delay,
            )
        else:
            delay = self._retry.next_delay()
            self.status.state = "backoff"
            level = logging.WARNING if connected_at is not None else logging.INFO
            log.log(level, "broker connection lost or refused (%s); retrying in %.1f s", exc, delay)
        self.status.next_attempt_in_s = round(delay, 3)
        if self._on_trouble is not None:
            what = (
                "the broker refused this device's credentials (revoked?)"
                if self.status.state == "auth_failed"
                else f"broker {self.identity.broker.url}: {self.status.last_error}"
            )
            self._on_trouble(f"{what}; retrying in {seconds(delay)}")
        return delay

    async def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; True if stopped meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
        except TimeoutError:
            return False
        return True

    async def _connected(self, client: aiomqtt.Client) -> None:
        subscriptions = [(self._topics[Channel.DESIRED], 1), (self._topics[Channel.CMD], 1)]
        granted = await client.subscribe(subscriptions)
        refused = [
            topic
            for (topic, _), code in zip(subscriptions, granted, strict=False)
            if isinstance(value := getattr(code, "value", code), int) and value >= 0x80
        ]
        if refused:
            # Without them no desired state arrives: reconnect (with backoff) and ask
            # again. A clustered broker refuses while it re-elects after losing a node
            # (docs/scale.md); a wrong ACL refuses every time, and this log says so.
            log.error("the broker refused the subscriptions to %s (check its ACL)", refused)
            raise aiomqtt.MqttError(f"subscriptions refused: {', '.join(refused)}")
        online = new_event(
            self.device_id,
            EventKind.ONLINE,
            "connected",
            data={"agent_version": agent_version(), "desired_version": self._newest_desired()},
        )
        await self._publish(client, Channel.EVENTS, encode(online))
        self.status.state, self.status.connected = "connected", True
        self.status.last_connected_at, self.status.last_error = utc_now(), None
        log.info("connected to the broker as device %s", self.device_id)
        self._outbox.set()
        self._report_due.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive(client))
                tasks.create_task(self._send(client))
                tasks.create_task(self._report(client))
                tasks.create_task(self._until_stopped(client))
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _publish(
        self,
        client: aiomqtt.Client,
        channel: Channel,
        payload: bytes,
        *,
        wait_s: float | None = None,
    ) -> None:
        """Publish with the channel's QoS and retain flag; returns once the broker has it."""
        policy = DeviceTopic(self.device_id, channel).policy
        await client.publish(
            self._topics[channel],
            payload,
            qos=policy.qos,
            retain=policy.retain,
            timeout=wait_s if wait_s is not None else self._publish_timeout_s,
        )

    async def _until_stopped(self, client: aiomqtt.Client) -> None:
        await self._stop.wait()
        offline = new_event(self.device_id, EventKind.OFFLINE, "agent shutting down")
        try:
            await self._publish(client, Channel.EVENTS, encode(offline), wait_s=_OFFLINE_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.info("could not send the OFFLINE event on shutdown: %s", exc)
        raise _Stopped

    # -- receiving ------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            try:
                self.handle(str(message.topic), data)
            except Exception:  # a handler bug must not drop the connection
                log.exception("fleet link: failed to handle a message on %s", message.topic)

    def handle(self, topic: str, payload: bytes) -> None:
        """Act on one incoming message; anything malformed or not for us is logged, ignored."""
        try:
            parsed = DeviceTopic.parse(topic)
        except TopicError as exc:
            log.warning("ignoring a message on an unexpected topic: %s", exc)
            return
        if parsed.device_id != self.device_id:
            log.warning("ignoring a message on another device's topic %s", topic)
            return
        if parsed.channel is Channel.DESIRED:
            if not payload:
                log.info("the controller cleared this device's desired state; keeping the models")
                return
            self._on_desired(payload)  # signed: the link verifies it before acting on it
        elif parsed.channel is Channel.CMD:
            try:
                command = decode(Command, payload)
            except WireError as exc:
                log.warning("ignoring a bad command: %s", exc)
                return
            if command.device_id != self.device_id:
                log.warning("ignoring a command for device %r", command.device_id)
                return
            log.info("command %s (%s)", command.kind.value, command.id)
            self._on_command(command)
        else:
            log.warning("ignoring a message on %s: the device does not read it", topic)

    # -- sending from the spool ----------------------------------------------------

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            self._outbox.clear()
            entries = await asyncio.to_thread(self.spool.head, MAX_SAMPLES_PER_BATCH, _BATCH_BYTES)
            if not entries:
                await self._outbox.wait()
                continue
            if entries[0].kind is EntryKind.SAMPLE:
                await self._send_batch(client, entries)
            else:
                await self._send_event(client, entries[0])

    async def _settle(self, call: Callable[[], bool]) -> None:
        await asyncio.to_thread(call)  # a refused delete is logged; the entry is skipped

    async def _send_batch(self, client: aiomqtt.Client, entries: list[Entry]) -> None:
        samples: list[TelemetrySample] = []
        good: list[Entry] = []
        bad: list[Entry] = []
        for entry in entries:
            try:
                samples.append(TelemetrySample.model_validate_json(entry.payload))
                good.append(entry)
            except ValidationError:
                bad.append(entry)
        if bad:
            log.error("dropping %d unreadable telemetry samples from the spool", len(bad))
            await asyncio.to_thread(self.spool.discard, bad)
        if not good:
            return
        dropped = (await asyncio.to_thread(self.spool.drops)).samples
        batch = TelemetryBatch(
            device_id=self.device_id, id=uuid.uuid4().hex, samples=samples, dropped=dropped
        )
        await self._publish(client, Channel.TELEMETRY, encode(batch))
        await self._settle(
            lambda: self.spool.ack(good, reported_samples=dropped, notice=self._drop_notice)
        )

    async def _send_event(self, client: aiomqtt.Client, entry: Entry) -> None:
        try:
            event = Event.model_validate_json(entry.payload)
        except ValidationError:
            log.error("dropping an unreadable event from the spool")
            await asyncio.to_thread(self.spool.discard, [entry])
            return
        if event.device_id != self.device_id:  # spooled under an earlier enrollment
            event = event.model_copy(update={"device_id": self.device_id})
        await self._publish(client, Channel.EVENTS, encode(event))
        await self._settle(lambda: self.spool.ack([entry], notice=self._drop_notice))

    def _drop_notice(self, settled: Drops) -> tuple[str, bytes]:
        event = new_event(
            self.device_id,
            EventKind.SPOOL_DROPPED,
            f"the telemetry spool dropped {settled.samples} samples and {settled.events} "
            "events (full, or the disk refused writes)",
            severity=Severity.WARNING,
            data={"samples": settled.samples, "events": settled.events},
        )
        return event.id, encode(event)

    # -- reporting ------------------------------------------------------------------

    async def _report(self, client: aiomqtt.Client) -> None:
        last_sent = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_due.wait(), timeout=_REPORT_CHECK_S)
            gap = _REPORT_MIN_GAP_S - (time.monotonic() - last_sent)
            if gap > 0:
                await asyncio.sleep(gap)  # throttle: changes within the gap go out together
            self._report_due.clear()
            forced, self._report_forced = self._report_forced, False
            report = self.host.report(self.device_id)
            key = report_key(report)
            if key == self._acked_report and not forced:
                continue
            await self._publish(client, Channel.REPORTED, encode(report))
            last_sent = time.monotonic()
            self._acked_report = key
            self.status.last_report_at = report.reported_at
            log.debug("reported state published (desired %s)", report.desired_version)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that ended a connection's task group, most telling first."""
    for kind in (_Stopped, aiomqtt.MqttError):
        found = group.subgroup(kind)
        if found is not None:
            return _leaf(found)
    return _leaf(group)


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first
