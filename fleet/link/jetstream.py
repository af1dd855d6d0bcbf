"""Ingest through NATS JetStream, so replicas share device messages without MQTT 5.

NATS's MQTT gateway speaks MQTT 3.1.1 only: ``$share/`` groups do not exist there
(docs/scale.md, "Sharing ingest on NATS without MQTT 5"). It does store every QoS 1
message a device publishes in its ``$MQTT_msgs`` stream (replicated, interest
retention) before the PUBACK. Each ingest channel gets one durable pull consumer on that
stream, named after the shared subscription group; every replica pulls from the same
consumers, so each message goes to one of them, and to another when it is not
acknowledged within ``nats_ingest_ack_wait_s`` (its replica was killed holding it).

The rule is the MQTT session's: a message is acknowledged only once the transaction
that stored it (or refused it for good) has committed, so a redelivered message is
either new or found a duplicate by ingest. :data:`MAX_ACK_PENDING` bounds what a
consumer hands out unacknowledged, across all replicas, so no replica is handed more
than the batch writer's backlog bound (three channels of it stay under 10,000 rows).
nats-py reconnects by itself; a lost or refused pull (a node re-electing the stream's
leader) is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.link.backoff import ReconnectPolicy
from fleet.link.ingest import INGEST_CHANNELS
from fleet.link.logs import RateLimitedLog
from fleet.link.session import OnMessage
from fleet.link.tasks import cancel, spawn
from fleet.link.writer import Settle
from models.topics import Channel, subscription

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

__all__ = [
    "MAX_ACK_PENDING",
    "STREAM",
    "JetStreamIngest",
    "consumer_name",
    "consumer_subject",
    "mqtt_topic",
]

log = logging.getLogger(__name__)

STREAM = "$MQTT_msgs"  # the gateway's stream of QoS 1 messages (nats-server 2.9 to 2.14)
SUBJECT_PREFIX = "$MQTT.msgs."  # its subjects: this prefix, then the topic with / as .
MAX_ACK_PENDING = 3_000  # per consumer, across replicas
FETCH_BATCH = 250  # messages asked for in one pull
FETCH_WAIT_S = 1.0  # how long one pull waits for messages
_NO_STREAM_YET = (
    f"; the MQTT gateway creates {STREAM} at its first MQTT connection (the controller's "
    "own, normally), so this passes once that is up; check mqtt {} in nats-server.conf if not"
)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def consumer_name(group: str | None, channel: Channel) -> str:
    """The durable consumer every replica of ``group`` pulls ``channel`` from."""
    name = f"{group or 'edgefleet'}-ingest-{channel.value}"
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"shared_subscription_group {group!r} cannot name a JetStream consumer: "
            "use letters, digits, - and _ only"
        )
    return name


def consumer_subject(channel: Channel) -> str:
    """The stream subjects of ``channel`` from every device."""
    return SUBJECT_PREFIX + subscription(channel).replace("/", ".").replace("+", "*")


def mqtt_topic(subject: str) -> str:
    """The MQTT topic a stream subject came from (ingest rejects anything malformed)."""
    return subject.removeprefix(SUBJECT_PREFIX).replace(".", "/")


class JetStreamIngest:
    """Pulls device messages from the gateway's stream for as long as it is entered."""

    def __init__(
        self,
        settings: FleetSettings,
        *,
        url: str,
        password: str,
        reconnect: ReconnectPolicy,
        on_message: OnMessage,
        warn: RateLimitedLog,
    ) -> None:
        self._settings = settings
        self._servers = [server.strip() for server in url.split(",")]  # checked by settings
        self._password = password
        self._reconnect = reconnect
        self._on_message = on_message
        self._warn = warn
        self._consumers = {
            channel: consumer_name(settings.shared_subscription_group, channel)
            for channel in INGEST_CHANNELS
        }
        self._client: NatsClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._acking: set[asyncio.Task[None]] = set()
        self._bound: set[Channel] = set()  # channels whose consumer is being pulled
        self.last_error: str | None = None

    @property
    def pulling(self) -> bool:
        """Every channel's consumer is bound and being pulled."""
        return len(self._bound) == len(INGEST_CHANNELS)

    async def __aenter__(self) -> JetStreamIngest:
        self._task = spawn(self._loop(), "jetstream")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop pulling; the connection stays for the acknowledgements still to come."""
        if self._task is not None:
            await cancel(self._task)

    async def close(self) -> None:
        """Send the acknowledgements of what was stored meanwhile, then disconnect.

        Called once ingest has stored what it held (``DeviceLink`` orders it so): what
        could not be acknowledged goes to another replica after the ack wait.
        """
        if self._acking:
            await asyncio.wait(self._acking, timeout=5.0)
        client = self._client
        if client is not None and client.is_connected:
            try:  # a PING answered: every acknowledgement before it reached the server
                await client.flush(timeout=5)
            except Exception as exc:  # redelivered after the ack wait, found stored
                log.warning("acknowledgements to JetStream may not have gone out: %s", exc)
        await self._close()

    async def _connect(self) -> NatsClient:
        import nats

        async def on_error(exc: Exception) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._warn.warning("jetstream", "NATS at %s: %s", self._servers, self.last_error)

        return await nats.connect(
            servers=self._servers,
            user=self._settings.broker_username,
            password=self._password,
            name=self._settings.client_id,
            connect_timeout=5,
            max_reconnect_attempts=-1,  # nats-py keeps reconnecting once connected
            reconnect_time_wait=self._reconnect.initial_s,
            error_cb=on_error,
        )

    async def _close(self) -> None:
        client, self._client = self._client, None
        self._bound.clear()
        if client is not None and not client.is_closed:
            try:
                await client.close()
            except Exception as exc:  # closing a dead connection can fail: nothing to do
                log.debug("closing the NATS connection failed: %s", exc)

    async def _loop(self) -> None:
        attempt = 0
        while True:
            try:
                self._client = await self._connect()
                js = self._client.jetstream()
                attempt = 0
                async with asyncio.TaskGroup() as pulls:  # one failing ends them all
                    for channel in INGEST_CHANNELS:
                        pulls.create_task(self._pull(js, channel))
            except Exception as exc:  # nats-py raises its own errors, and OSErrors
                if isinstance(exc, ExceptionGroup):
                    exc = exc.exceptions[0]
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._warn.warning(
                    "jetstream",
                    "JetStream ingest from %s failed: %s%s",
                    self._servers,
                    exc,
                    _NO_STREAM_YET if "stream not found" in str(exc) else "; retrying",
                )
            await self._close()
            await asyncio.sleep(self._reconnect.delay(attempt))
            attempt += 1

    async def _pull(self, js: JetStreamContext, channel: Channel) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        name = self._consumers[channel]
        await self._ensure_consumer(js, channel)
        subscription = await js.pull_subscribe_bind(durable=name, stream=STREAM)
        log.info("pulling %s from JetStream consumer %s on %s", channel.value, name, STREAM)
        self._bound.add(channel)
        while True:
            try:
                batch = await subscription.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
            except (NatsTimeout, TimeoutError):  # nothing to pull right now
                continue
            for message in batch:
                topic = mqtt_topic(message.subject)
                self._on_message(topic, message.data, False, self._settle(message))

    async def _ensure_consumer(self, js: JetStreamContext, channel: Channel) -> None:
        """Create the channel's durable consumer unless a replica already has."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        name = self._consumers[channel]
        try:
            info = await js.consumer_info(STREAM, name)
        except NotFoundError:
            config = ConsumerConfig(  # a durable name and no name: nats-server 2.9's API
                durable_name=name,
                filter_subject=consumer_subject(channel),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._settings.nats_ingest_ack_wait_s,
                max_ack_pending=MAX_ACK_PENDING,
            )
            await js.add_consumer(STREAM, config)
            return
        ack_wait = info.config.ack_wait
        if ack_wait is not None and ack_wait != self._settings.nats_ingest_ack_wait_s:
            log.warning(
                "JetStream consumer %s keeps its ack_wait of %.1f s, not the configured "
                "%.1f s: delete it (nats consumer rm) while no replica runs to change it",
                name,
                ack_wait,
                self._settings.nats_ingest_ack_wait_s,
            )

    def _settle(self, message: Msg) -> Settle:
        def settle() -> None:
            task = asyncio.get_running_loop().create_task(self._ack(message))
            self._acking.add(task)
            task.add_done_callback(self._acking.discard)

        return settle

    async def _ack(self, message: Msg) -> None:
        try:
            await message.ack()
        except Exception as exc:  # redelivered after ACK_WAIT_S; ingest finds it stored
            self._warn.warning("jetstream-ack", "cannot acknowledge to JetStream: %s", exc)
