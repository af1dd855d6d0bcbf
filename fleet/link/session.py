"""The controller's MQTT session: one aiomqtt client, kept connected and subscribed.

The client has ``client_id`` and a persistent session (``clean_session`` False; on
MQTT 5 ``clean_start`` False with a session expiry), so QoS 1 messages published while
the controller was away arrive when it comes back. It reconnects forever with
exponential backoff and jitter; while the broker is down :attr:`MqttSession.connected`
is False and :meth:`MqttSession.publish` raises ``BrokerUnavailable``. A broker that
does not speak MQTT 5 gets MQTT 3.1.1 instead. On every connect it subscribes (QoS 1,
MQTT 5 shared subscriptions when a group is set; nothing when ingest comes through
JetStream instead) and runs ``on_connect`` for as long as that connection lasts.

Each message goes to ``on_message`` with a *settle* callback, and a QoS 1 message is
acknowledged to the broker (PUBACK) only once the ingest settles it: after the database
transaction that stored it, found it a duplicate or refused it for good has committed,
or at once when it is rejected before it is buffered. paho's own acknowledgement on
receipt is switched off (manual acks). A retained message (sent again on every
subscribe) is acknowledged at once. PUBACKs go out in the order the messages came
(MQTT 3.1.1 and 5, section 4.6), each on the connection that received its message:
what a lost connection (or a killed controller) did not acknowledge, the broker sends
again to the persistent session, and ingest finds it a duplicate if it was stored.

A broker sends a client only so many unacknowledged messages at a time: on MQTT 5 the
session asks for :data:`RECEIVE_MAXIMUM` (a broker may grant fewer); on MQTT 3.1.1 the
broker decides (Mosquitto: ``max_inflight_messages``, 20 by default). So a small window
does not throttle ingest, the batch writer writes early once a few messages wait for
their acknowledgement (:data:`fleet.link.writer.FLUSH_AT_UNSETTLED`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.config import FleetSettings
from fleet.errors import BrokerUnavailable
from fleet.link.backoff import ReconnectPolicy
from fleet.link.ingest import INGEST_CHANNELS
from fleet.link.logs import RateLimitedLog
from fleet.link.tasks import cancel, spawn
from fleet.link.writer import Settle
from models.topics import shared_subscription, subscription

__all__ = [
    "PENDING_CALLS_WARN",
    "RECEIVE_MAXIMUM",
    "SESSION_EXPIRY_S",
    "Acknowledger",
    "MqttSession",
    "OnMessage",
]

log = logging.getLogger(__name__)

PENDING_CALLS_WARN = 256  # publishes in flight before aiomqtt logs that the broker lags

SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: how long the broker keeps our session while away
RECEIVE_MAXIMUM = 1000  # MQTT 5: unacknowledged QoS 1 messages the broker may send us at once
_UNSUPPORTED_PROTOCOL = {1, 0x84}  # MQTT 3.1.1 and MQTT 5 "unsupported protocol version"
_SHARED_NOT_SUPPORTED = {0x9E, 0x8F}  # MQTT 5 "shared subs not supported", "filter invalid"

# (topic, payload, retained, settle); must not raise. ``settle`` (None when the broker
# awaits no acknowledgement) must be called once, on the event loop, when the message is
# stored or will never be: only then is it acknowledged.
OnMessage = Callable[[str, Any, bool, Settle | None], None]


class _Pending:
    __slots__ = ("mid", "qos", "settled")

    def __init__(self, mid: int, qos: int) -> None:
        self.mid = mid
        self.qos = qos
        self.settled = False


class Acknowledger:
    """The PUBACKs one connection owes, sent in the order their messages came.

    ``ack`` is paho's ``Client.ack`` of that connection; after :meth:`close` (the
    connection is gone) nothing more is sent: the broker redelivers what is left.
    """

    def __init__(self, ack: Callable[[int, int], object]) -> None:
        self._ack = ack
        self._pending: deque[_Pending] = deque()
        self._open = True

    @property
    def waiting(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._pending)

    def expect(self, mid: int, qos: int) -> Settle:
        """Owe a PUBACK for ``mid``: sent once the returned callback was called.

        And once every message received before this one was acknowledged.
        """
        entry = _Pending(mid, qos)
        self._pending.append(entry)

        def settle() -> None:
            entry.settled = True
            self._send_settled()

        return settle

    def close(self) -> None:
        self._open = False
        self._pending.clear()

    def _send_settled(self) -> None:
        pending = self._pending
        while self._open and pending and pending[0].settled:
            entry = pending.popleft()
            try:
                self._ack(entry.mid, entry.qos)
            except Exception:  # a connection going away; the broker redelivers
                log.debug("acknowledging message %d failed", entry.mid, exc_info=True)


def _is_unsupported_protocol(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    value = getattr(exc.rc, "value", exc.rc)
    return isinstance(value, int) and value in _UNSUPPORTED_PROTOCOL


def _code(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else 0x80


class MqttSession:
    """Connects, subscribes and reconnects for as long as it is entered."""

    def __init__(
        self,
        settings: FleetSettings,
        *,
        broker_url: str,
        password: str,
        mqtt5: bool,
        reconnect: ReconnectPolicy,
        on_message: OnMessage,
        on_connect: Callable[[], Coroutine[Any, Any, None]],
        warn: RateLimitedLog,
        ingest: bool = True,
    ) -> None:
        self._settings = settings
        self._ingest = ingest  # False: device messages come another way (fleet.link.jetstream)
        self._broker_url = broker_url
        self._password = password
        self._protocol = aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311
        self._reconnect = reconnect
        self._on_message = on_message
        self._on_connect = on_connect
        self._warn = warn
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.shared = False  # subscribed through $share/<group>/
        self.last_error: str | None = None  # the last connection error

    async def __aenter__(self) -> MqttSession:
        self._task = spawn(self._loop(), "session")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        if self._task is not None:
            await cancel(self._task)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        """The MQTT version of the current (or last) connection: '5' or '3.1.1'."""
        return "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"

    async def wait_connected(self) -> None:
        """Wait until the session is up (wrap it in ``asyncio.timeout``)."""
        await self._connected.wait()

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish at QoS 1; ``BrokerUnavailable`` when not connected or the publish fails."""
        client = self._client
        if client is None or not self._connected.is_set():
            raise BrokerUnavailable(f"not connected to the MQTT broker at {self._broker_url}")
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publishing to {topic} failed: {exc}") from exc

    def _make_client(self) -> aiomqtt.Client:
        url = urlsplit(self._broker_url)
        secure = url.scheme == "mqtts"
        tls_context = None
        if secure:
            ca = self._settings.broker_ca_file
            tls_context = ssl.create_default_context(cafile=str(ca) if ca else None)
        common: dict[str, Any] = {
            "hostname": url.hostname or "127.0.0.1",
            "port": url.port or (8883 if secure else 1883),
            "username": self._settings.broker_username,
            "password": self._password,
            "identifier": self._settings.client_id,
            "keepalive": 30,
            "timeout": 10,
            "max_inflight_messages": 100,
            "tls_context": tls_context,
        }
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            client = aiomqtt.Client(
                **common,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=properties,
            )
        else:
            client = aiomqtt.Client(
                **common, protocol=aiomqtt.ProtocolVersion.V311, clean_session=False
            )
        # Acknowledge a message only once it is stored: aiomqtt has no switch for this,
        # paho (its engine) does. See the module docstring for why.
        client._client.manual_ack_set(True)
        # Publishing one change to thousands of devices keeps 64 publishes in flight
        # (fleet.desired, fleet.link.publish) by design; aiomqtt warns above 10.
        client.pending_calls_threshold = PENDING_CALLS_WARN
        return client

    async def _loop(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                async with self._make_client() as client:
                    attempt = 0
                    await self._run(client)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                if self._protocol is aiomqtt.ProtocolVersion.V5 and _is_unsupported_protocol(exc):
                    log.warning(
                        "the broker at %s does not speak MQTT 5: falling back to MQTT 3.1.1 "
                        "without shared subscriptions, so run a single controller replica",
                        self._broker_url,
                    )
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                self.last_error = str(exc) or type(exc).__name__
                self._warn.warning(
                    "session", "MQTT broker %s unavailable: %s", self._broker_url, self.last_error
                )
            except Exception as exc:  # never let a surprise end the session for good
                if self._closing:
                    return
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("MQTT session failed; reconnecting")
            finally:
                if self._connected.is_set() and not self._closing:
                    log.warning("disconnected from the MQTT broker at %s", self._broker_url)
                self._connected.clear()
                self._client = None
            await asyncio.sleep(self._reconnect.delay(attempt))
            attempt += 1

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        group = self._settings.shared_subscription_group
        self.shared = False
        if not self._ingest:
            # A persistent session may still hold the subscriptions of an earlier run,
            # which would bring every message a second time: drop them.
            await client.unsubscribe([subscription(channel) for channel in INGEST_CHANNELS])
            return
        if group is not None and self._protocol is aiomqtt.ProtocolVersion.V5:
            filters = [(shared_subscription(group, channel), 1) for channel in INGEST_CHANNELS]
            codes = [_code(rc) for rc in await client.subscribe(filters)]
            if all(code < 0x80 for code in codes):
                self.shared = True
                return
            if any(code in _SHARED_NOT_SUPPORTED for code in codes):
                log.warning(
                    "the broker at %s refused shared subscriptions: subscribing without them",
                    self._broker_url,
                )
            else:
                log.error("the broker refused the controller's shared subscriptions: %s", codes)
        filters = [(subscription(channel), 1) for channel in INGEST_CHANNELS]
        codes = [_code(rc) for rc in await client.subscribe(filters)]
        if any(code >= 0x80 for code in codes):
            # Reconnect and ask again: a clustered broker refuses while it re-elects after
            # losing a node (docs/scale.md); a wrong ACL refuses every time, logged here.
            log.error(
                "the broker refused the controller's subscriptions %s (codes %s): check the "
                "controller's ACL (docs/broker.md)",
                [topic for topic, _ in filters],
                codes,
            )
            raise aiomqtt.MqttError(f"subscriptions refused (codes {codes})")

    async def _run(self, client: aiomqtt.Client) -> None:
        self._client = client
        messages = client.messages
        await self._subscribe(client)
        self._connected.set()
        self.last_error = None
        log.info(
            "connected to the MQTT broker at %s (MQTT %s%s)",
            self._broker_url,
            self.protocol,
            ", shared subscriptions" if self.shared else "",
        )
        on_connect = spawn(self._on_connect(), "on-connect")
        acks = Acknowledger(client._client.ack)  # paho's manual acknowledgements
        try:
            async for message in messages:
                settle: Settle | None = None
                if message.qos:
                    settle = acks.expect(message.mid, message.qos)
                    if message.retain:  # sent again on every subscribe: acknowledge it now
                        settle()
                        settle = None
                self._on_message(message.topic.value, message.payload, message.retain, settle)
        finally:
            acks.close()
            failure = await cancel(on_connect)
            if failure is not None:
                log.warning("the on-connect work of the session failed: %s", failure)
