"""The controller's MQTT link: one persistent session, ingest, presence and retention.

:class:`DeviceLink` is an async context manager the app's lifespan enters once. Inside:

- **broker auth**: on entry and on every :meth:`~DeviceLink.sync_auth` it writes the
  broker's password and ACL files from the database and makes the broker reload
  (:mod:`fleet.link.broker_auth`); with no ``broker_url`` it runs the embedded broker
  (:mod:`fleet.link.embedded`) on those same files.
- **session**: an aiomqtt client with ``client_id`` and a persistent session
  (``clean_session`` False; on MQTT 5 ``clean_start`` False with a session expiry), so
  QoS 1 messages published while the controller was away arrive when it comes back.
  It reconnects forever with exponential backoff and jitter; while the broker is down
  ``status().connected`` is False and publishing raises ``BrokerUnavailable``. On every
  connect it subscribes (QoS 1, MQTT 5 shared subscriptions when a group is set) and
  republishes every non-revoked device's stored desired state, retained.
- **ingest**: each message is parsed once (:func:`fleet.link.ingest.parse`), checked
  against a cache of device ids, handed to the batch writer (:mod:`fleet.link.writer`)
  and acknowledged. Messages are acknowledged to the broker once buffered (not when
  paho reads them), so a clean shutdown loses nothing: what was not yet taken is
  redelivered on the next session.
- **presence and retention**: devices silent for three heartbeats are marked offline;
  telemetry and events older than ``retention_days`` are deleted, at start and hourly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import sqlalchemy as sa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from fleet.config import FleetSettings
from fleet.errors import BrokerUnavailable, ConfigError, DatabaseUnavailable
from fleet.link import store
from fleet.link.broker_auth import (
    PASSWORD_FILE,
    DeviceCredential,
    controller_password,
    write_auth_files,
)
from fleet.link.embedded import EmbeddedBroker
from fleet.link.ingest import (
    INGEST_CHANNELS,
    Accepted,
    DeviceDirectory,
    Reason,
    Rejection,
    Standing,
    parse,
)
from fleet.link.passwords import hash_password
from fleet.link.writer import BatchWriter
from models.topics import Channel, DeviceTopic, shared_subscription, subscription
from models.wire import Command, DesiredState, encode

__all__ = ["DeviceLink", "LinkStats", "ReconnectPolicy"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: how long the broker keeps our session while away
DIRECTORY_REFRESH_S = 30.0  # re-read device ids this often, besides after sync_auth
UNKNOWN_REFRESH_GAP_S = 1.0  # at most one extra re-read a second for unknown ids
MAX_PARKED = 10_000  # messages from unknown ids waiting for that re-read
RETENTION_EVERY_S = 3600.0
SHUTDOWN_FLUSH_S = 10.0  # how long exit keeps trying to store what is buffered
REJECT_LOG_EVERY_S = 10.0  # per reason
_UNSUPPORTED_PROTOCOL = {1, 0x84}  # MQTT 3.1.1 and MQTT 5 "unsupported protocol version"
_SHARED_NOT_SUPPORTED = {0x9E, 0x8F}  # MQTT 5 "shared subs not supported", "filter invalid"


@dataclass(frozen=True)
class ReconnectPolicy:
    """Backoff between connection attempts: ``initial_s`` doubling up to ``max_s``, jittered."""

    initial_s: float = 0.5  # seconds
    max_s: float = 15.0  # seconds

    def delay(self, attempt: int) -> float:
        """Equal jitter: half the exponential step fixed, half random."""
        step = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 30))
        return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not crypto


@dataclass
class LinkStats:
    """A snapshot of the link, for /readyz and the dashboard (satisfies ``LinkStatus``)."""

    connected: bool
    broker_url: str
    embedded_broker: bool
    received: int  # MQTT messages received since start
    stored: int  # telemetry samples and events written (duplicates excluded)
    duplicates: int  # samples and events already stored, skipped
    rejected: int  # payloads dropped as invalid, oversized, unknown or misaddressed
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    protocol: str = "3.1.1"  # MQTT version of the current (or last) session
    shared_subscription: bool = False  # subscribed through $share/<group>/
    backlog: int = 0  # messages received, not yet stored
    db_retries: int = 0  # batch writes retried because the database was unavailable
    overflowed: int = 0  # messages dropped because the backlog was full
    last_error: str | None = None  # the last connection error, while disconnected


class _RateLimitedLog:
    """At most one line per key every ``every_s`` seconds, saying how many were held back."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self._logger = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._held[key] += 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it since the last report)"
            args = (*args, held)
        self._logger.warning(msg, *args)


def _is_unsupported_protocol(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    value = getattr(exc.rc, "value", exc.rc)
    return isinstance(value, int) and value in _UNSUPPORTED_PROTOCOL


def _code(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else 0x80


class DeviceLink:
    """The controller's side of MQTT (implements :class:`fleet.link.port.LinkPort`)."""

    def __init__(
        self,
        settings: FleetSettings,
        engine: sa.Engine,
        *,
        sign_desired: Callable[[DesiredState], bytes],
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._sign_desired = sign_desired  # the director key's DSSE envelope
        self._reconnect = reconnect or ReconnectPolicy()
        self._embedded: EmbeddedBroker | None = None
        self._broker_url = settings.resolved_broker_url
        self._password = ""
        self._controller_hash = ""
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._protocol = aiomqtt.ProtocolVersion.V311
        self._shared = False
        self._last_error: str | None = None
        self._auth_lock = asyncio.Lock()
        self._directory = DeviceDirectory()
        self._parked: list[Accepted] = []
        self._refresh_now = asyncio.Event()
        self._closing = False
        self._received = 0
        self._rejected: Counter[str] = Counter()
        self._reject_log = _RateLimitedLog(log, REJECT_LOG_EVERY_S)
        self._warn_log = _RateLimitedLog(log, REJECT_LOG_EVERY_S)
        self._writer: BatchWriter | None = None
        # Desired versions published in the current session (see _republish_desired).
        self._published: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session_task: asyncio.Task[None] | None = None
        self._flusher_task: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> DeviceLink:
        store.check_dialect(self._engine)
        settings = self._settings
        self._password = await asyncio.to_thread(controller_password, settings)
        self._controller_hash = await asyncio.to_thread(hash_password, self._password)
        self._writer = BatchWriter(
            self._engine,
            batch_rows=settings.ingest_batch_rows,
            flush_s=settings.ingest_flush_ms / 1000,
            retry_delay=self._reconnect.delay,
            reject=self._reject,
            warn=self._warn_log.warning,
        )
        try:
            await self.sync_auth()
            if settings.broker_url is None:
                embedded = EmbeddedBroker(
                    host=settings.embedded_broker_host,
                    port=settings.embedded_broker_port,
                    password_file=settings.resolved_auth_dir / PASSWORD_FILE,
                    controller_username=settings.broker_username,
                )
                await embedded.__aenter__()
                self._embedded = embedded
                self._broker_url = embedded.url
            if settings.shared_subscription_group is not None:
                if self._embedded is not None:
                    log.warning(
                        "shared_subscription_group %r needs MQTT 5, and the embedded broker "
                        "speaks MQTT 3.1.1 only: subscribing without shared subscriptions, so "
                        "run a single controller replica (or use Mosquitto/EMQX/HiveMQ)",
                        settings.shared_subscription_group,
                    )
                else:
                    self._protocol = aiomqtt.ProtocolVersion.V5
        except BaseException:
            await self._stop_embedded()
            self._writer.shutdown()
            raise
        self._flusher_task = self._spawn(self._writer.run(), "flusher")
        self._session_task = self._spawn(self._session_loop(), "session")
        self._tasks += [
            self._spawn(self._directory_loop(), "directory"),
            self._spawn(self._presence_loop(), "presence"),
            self._spawn(self._retention_loop(), "retention"),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Stop taking messages first (what is not acknowledged is redelivered next
        # session), then store what was taken, then stop the rest.
        self._closing = True
        if self._session_task is not None:
            await self._cancel(self._session_task)
        if self._writer is not None:
            self._writer.close(SHUTDOWN_FLUSH_S)
        if self._flusher_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher_task), SHUTDOWN_FLUSH_S + 5)
            except TimeoutError:
                await self._cancel(self._flusher_task)
        for task in self._tasks:
            await self._cancel(task)
        self._tasks.clear()
        await self._stop_embedded()
        if self._writer is not None:
            self._writer.shutdown()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=f"edgefleet-link-{name}")

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> BaseException | None:
        """Cancel ``task`` and wait until it ends; the exception it ended with, if any.

        A library can turn a cancellation into its own error on the way out (aiomqtt
        may, while disconnecting), and a loop that catches that error would go on; so
        the task is cancelled again until it is really done.
        """
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)
        if task.cancelled():
            return None
        return task.exception()

    async def _stop_embedded(self) -> None:
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await embedded.__aexit__(None, None, None)

    # --- LinkPort ----------------------------------------------------------------------

    async def sync_auth(self) -> None:
        """Rewrite the broker's password and ACL files from the database; make it reload."""
        async with self._auth_lock:
            credentials = await asyncio.to_thread(store.load_credentials, self._engine)
            self._install_directory(credentials)
            if not self._settings.manage_broker_auth:
                return
            try:
                files = await asyncio.to_thread(
                    write_auth_files, self._settings, self._controller_hash, credentials
                )
            except OSError as exc:
                raise ConfigError(f"cannot write the broker's auth files: {exc}") from exc
            if self._embedded is not None:
                await self._embedded.disconnect_unauthorized()
            log.debug("broker auth synced: %d devices, reloaded=%s", files.devices, files.reloaded)

    async def publish_desired(self, state: DesiredState) -> None:
        topic = str(DeviceTopic(state.device_id, Channel.DESIRED))
        self._published[state.device_id] = max(
            self._published.get(state.device_id, 0), state.version
        )
        await self._publish(topic, self._sign_desired(state), retain=True)

    async def clear_desired(self, device_id: str) -> None:
        """Clear a revoked device's retained desired state (and its reported state).

        The reported state goes too: every controller restart would re-read it, and
        reject it as coming from a revoked device.
        """
        self._published[device_id] = sys.maxsize  # never republish it in this session
        await self._publish(str(DeviceTopic(device_id, Channel.DESIRED)), b"", retain=True)
        await self._publish(str(DeviceTopic(device_id, Channel.REPORTED)), b"", retain=True)

    async def send_command(self, command: Command) -> None:
        topic = str(DeviceTopic(command.device_id, Channel.CMD))
        await self._publish(topic, encode(command), retain=False)

    def status(self) -> LinkStats:
        writer = self._writer
        return LinkStats(
            connected=self._connected.is_set(),
            broker_url=self._broker_url,
            embedded_broker=self._settings.broker_url is None,
            received=self._received,
            stored=writer.stored if writer else 0,
            duplicates=writer.duplicates if writer else 0,
            rejected=sum(self._rejected.values()),
            rejected_by_reason=dict(self._rejected),
            protocol="5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1",
            shared_subscription=self._shared,
            backlog=writer.backlog if writer else 0,
            db_retries=writer.db_retries if writer else 0,
            overflowed=writer.overflowed if writer else 0,
            last_error=None if self._connected.is_set() else self._last_error,
        )

    # --- helpers tests and the app may use ---------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the session is up (wrap it in ``asyncio.timeout``)."""
        await self._connected.wait()

    # --- publishing ----------------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        client = self._client
        if client is None or not self._connected.is_set():
            raise BrokerUnavailable(f"not connected to the MQTT broker at {self._broker_url}")
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"publishing to {topic} failed: {exc}") from exc

    async def _republish_desired(self, client: aiomqtt.Client) -> None:
        """Publish every stored desired state again (retained), as a new session starts.

        The broker may have lost its retained messages (restarted without persistence,
        or the embedded one); republishing is harmless because agents ignore versions
        they have applied. A state that :meth:`publish_desired` already sent in this
        session, at the same or a newer version, is skipped, so a stale read can never
        overwrite a newer retained state.
        """
        attempt = 0
        while True:
            try:
                rows = await asyncio.to_thread(store.load_desired, self._engine)
                break
            except DatabaseUnavailable as exc:
                self._warn_log.warning("republish", "cannot read desired states yet: %s", exc)
                await asyncio.sleep(self._reconnect.delay(attempt))
                attempt += 1
        slots = asyncio.Semaphore(64)
        sent = 0

        async def one(device_id: str, stored: dict[str, Any]) -> None:
            nonlocal sent
            try:
                state = DesiredState.model_validate(stored)
            except ValidationError as exc:
                log.error(
                    "device %s: stored desired state is invalid, not republished: %s",
                    device_id,
                    exc,
                )
                return
            if state.device_id != device_id:
                log.error(
                    "device %s: stored desired state names %s; not republished",
                    device_id,
                    state.device_id,
                )
                return
            async with slots:
                if self._published.get(device_id, 0) >= state.version:
                    return
                self._published[device_id] = state.version
                topic = str(DeviceTopic(device_id, Channel.DESIRED))
                await client.publish(topic, self._sign_desired(state), qos=1, retain=True)
                sent += 1

        results = await asyncio.gather(
            *(one(device_id, stored) for device_id, stored in rows), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # The session is going down; the next one republishes everything again.
            log.warning(
                "republished %d desired states; %d failed: %s", sent, len(failures), failures[0]
            )
        else:
            log.info("republished %d desired states", sent)

    # --- the session -------------------------------------------------------------------

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
        # Acknowledge a message only once it is buffered: aiomqtt has no switch for
        # this, paho (its engine) does. See the module docstring for why.
        client._client.manual_ack_set(True)
        return client

    async def _session_loop(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                client = self._make_client()
                async with client:
                    attempt = 0
                    await self._run_session(client)
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
                self._last_error = str(exc) or type(exc).__name__
                self._warn_log.warning(
                    "session", "MQTT broker %s unavailable: %s", self._broker_url, self._last_error
                )
            except Exception as exc:  # never let a surprise end the session for good
                if self._closing:
                    return
                self._last_error = f"{type(exc).__name__}: {exc}"
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
        self._shared = False
        if group is not None and self._protocol is aiomqtt.ProtocolVersion.V5:
            filters = [(shared_subscription(group, channel), 1) for channel in INGEST_CHANNELS]
            codes = [_code(rc) for rc in await client.subscribe(filters)]
            if all(code < 0x80 for code in codes):
                self._shared = True
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
            log.error(
                "the broker refused the controller's subscriptions %s (codes %s): check the "
                "controller's ACL (docs/broker.md)",
                [topic for topic, _ in filters],
                codes,
            )

    async def _run_session(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._published.clear()
        messages = client.messages
        await self._subscribe(client)
        self._connected.set()
        self._last_error = None
        log.info(
            "connected to the MQTT broker at %s (MQTT %s%s)",
            self._broker_url,
            "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1",
            ", shared subscriptions" if self._shared else "",
        )
        republish = self._spawn(self._republish_desired(client), "republish")
        paho = client._client  # for manual acknowledgements
        try:
            async for message in messages:
                try:
                    self._on_message(message.topic.value, message.payload, message.retain)
                except Exception:  # a bug; never let one message stop the session
                    log.exception("ingest failed on a message on %s", message.topic.value)
                    self._rejected[Reason.INTERNAL_ERROR.value] += 1
                if message.qos:
                    paho.ack(message.mid, message.qos)
        finally:
            failure = await self._cancel(republish)
            if failure is not None:
                log.warning("republishing desired states failed: %s", failure)

    # --- ingest ------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: Any, retained: bool) -> None:
        self._received += 1
        data = payload if isinstance(payload, bytes) else bytes(payload or b"")
        if not data and topic.endswith("/" + Channel.REPORTED.value):
            return  # a retained reported state being cleared (clear_desired): nothing to store
        result = parse(topic, data, received_at=datetime.now(UTC), retained=retained)
        if isinstance(result, Rejection):
            self._reject(result)
            return
        standing = self._directory.standing(result.device_id)
        if standing is Standing.ACTIVE:
            self._enqueue(result)
        elif standing is Standing.REVOKED:
            self._reject(Rejection(Reason.REVOKED_DEVICE, "the device is revoked", topic))
        elif len(self._parked) < MAX_PARKED:
            # Perhaps enrolled a moment ago (or on another replica): look again first.
            self._parked.append(result)
            self._refresh_now.set()
        else:
            self._reject(Rejection(Reason.UNKNOWN_DEVICE, "no such device", topic))

    def _reject(self, rejection: Rejection) -> None:
        self._rejected[rejection.reason.value] += 1
        self._reject_log.warning(
            rejection.reason.value,
            "rejected a message on %s: %s: %s",
            rejection.topic,
            rejection.reason.value,
            rejection.detail,
        )

    def _enqueue(self, item: Accepted) -> None:
        assert self._writer is not None, "the link is not entered"
        self._writer.add(item)

    # --- device directory ----------------------------------------------------------------

    def _install_directory(self, credentials: list[DeviceCredential]) -> None:
        self._directory.replace({c.device_id: c.revoked for c in credentials})
        parked, self._parked = self._parked, []
        for item in parked:
            standing = self._directory.standing(item.device_id)
            if standing is Standing.ACTIVE:
                self._enqueue(item)
                continue
            topic = str(DeviceTopic(item.device_id, item.channel))
            if standing is Standing.REVOKED:
                self._reject(Rejection(Reason.REVOKED_DEVICE, "the device is revoked", topic))
            else:
                self._reject(Rejection(Reason.UNKNOWN_DEVICE, "no such device", topic))

    async def _directory_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(), DIRECTORY_REFRESH_S)
            self._refresh_now.clear()
            try:
                credentials = await asyncio.to_thread(store.load_credentials, self._engine)
            except DatabaseUnavailable as exc:
                self._warn_log.warning("directory", "cannot re-read device ids: %s", exc)
            else:
                self._install_directory(credentials)
            await asyncio.sleep(UNKNOWN_REFRESH_GAP_S)

    # --- presence and retention ------------------------------------------------------------

    async def _every(self, interval_s: float, name: str, job: Callable[[], None]) -> None:
        while True:
            try:
                await asyncio.to_thread(job)
            except DatabaseUnavailable as exc:
                self._warn_log.warning(name, "%s skipped: %s", name, exc)
            except Exception:
                log.exception("%s failed", name)
            await asyncio.sleep(interval_s)

    def _mark_offline(self) -> None:
        silent = timedelta(seconds=3 * self._settings.heartbeat_interval_s)
        changed = store.mark_offline(self._engine, datetime.now(UTC) - silent)
        if changed:
            log.info("%d device(s) went silent: marked offline", changed)

    def _prune(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(days=self._settings.retention_days)
        samples, events = store.prune(self._engine, cutoff)
        if samples or events:
            log.info(
                "retention: deleted %d samples and %d events before %s", samples, events, cutoff
            )

    async def _presence_loop(self) -> None:
        interval = min(max(self._settings.heartbeat_interval_s / 2, 0.05), 30.0)
        await asyncio.sleep(interval)
        await self._every(interval, "presence", self._mark_offline)

    async def _retention_loop(self) -> None:
        await self._every(RETENTION_EVERY_S, "retention", self._prune)
