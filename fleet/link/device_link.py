"""The controller's link to its devices: the parts below, entered and left as one.

:class:`DeviceLink` is the async context manager the app's lifespan enters once; it
implements :class:`fleet.link.port.LinkPort` for the API. An ``AsyncExitStack`` owns
what it starts, in this order (and leaves in the reverse one):

1. ingest routing (:mod:`fleet.link.router`): the batch writer's flusher and the
   device directory; leaving stores what was buffered;
2. broker auth (:mod:`fleet.link.broker_auth`): the broker's users and their rights,
   written from the database now and on every :meth:`DeviceLink.sync_auth`;
3. the embedded broker (:mod:`fleet.link.embedded`) on those files, when no
   ``broker_url`` is set;
4. housekeeping (:mod:`fleet.link.housekeeping`): presence and retention;
5. the MQTT session (:mod:`fleet.link.session`), which republishes the stored desired
   states on every connect (:mod:`fleet.link.publish`);
6. with ``nats_ingest_url``, JetStream ingest (:mod:`fleet.link.jetstream`), which then
   takes the device messages instead of the session.

The last two are left first, so the controller stops taking messages before it stores
the last of them; the NATS connection closes after that, so what was stored on the way
out is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import sqlalchemy as sa

from fleet.config import FleetSettings
from fleet.db import BROKER_AUTH_LOCK, advisory_lock
from fleet.errors import ConfigError
from fleet.link import store
from fleet.link.backoff import ReconnectPolicy
from fleet.link.broker_auth import PASSWORD_FILE, controller_password, write_auth_files
from fleet.link.embedded import EmbeddedBroker
from fleet.link.housekeeping import Housekeeping
from fleet.link.jetstream import JetStreamIngest
from fleet.link.logs import RateLimitedLog
from fleet.link.passwords import hash_bcrypt, hash_password
from fleet.link.publish import DesiredPublisher
from fleet.link.router import IngestRouter
from fleet.link.session import MqttSession
from models.wire import Command, DesiredState

__all__ = ["DeviceLink", "LinkStats"]

log = logging.getLogger(__name__)

WARN_EVERY_S = 10.0  # per kind of trouble (broker down, database down, backlog full)


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
    # How device messages come in: "mqtt", "mqtt-shared" (a $share group), "jetstream"
    # (pulling from NATS JetStream) or "jetstream-waiting" (not pulling yet, or not now).
    ingest: str = "mqtt"
    backlog: int = 0  # messages received, not yet stored
    db_retries: int = 0  # batch writes retried because the database was unavailable
    overflowed: int = 0  # messages dropped because the backlog was full
    last_error: str | None = None  # the last connection error, while disconnected


class DeviceLink:
    """The controller's side of MQTT (implements :class:`fleet.link.port.LinkPort`)."""

    def __init__(
        self,
        settings: FleetSettings,
        engine: sa.Engine,
        *,
        sign_desired: Callable[[DesiredState], bytes],
        reconnect: ReconnectPolicy | None = None,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._sign_desired = sign_desired
        self._leads = leads  # presence and retention run on the leader replica only
        self._reconnect = reconnect or ReconnectPolicy()
        self._warn = RateLimitedLog(log, WARN_EVERY_S)
        self._ingest = IngestRouter(
            engine, settings, retry_delay=self._reconnect.delay, warn=self._warn
        )
        self._broker_url = settings.resolved_broker_url
        self._controller_hash = ""
        self._auth_lock = asyncio.Lock()
        self._auth_wanted = 0  # sync_auth calls so far
        self._auth_done = 0  # calls the last finished sync covered
        self._embedded: EmbeddedBroker | None = None
        self._session: MqttSession | None = None
        self._jetstream: JetStreamIngest | None = None
        self._publisher: DesiredPublisher | None = None
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> DeviceLink:
        store.check_dialect(self._engine)
        settings = self._settings
        password = await asyncio.to_thread(controller_password, settings)
        hash_for_broker = hash_bcrypt if settings.broker_auth_format == "nats" else hash_password
        self._controller_hash = await asyncio.to_thread(hash_for_broker, password)
        async with AsyncExitStack() as stack:
            if settings.nats_ingest_url is not None:
                self._jetstream = JetStreamIngest(
                    settings,
                    url=settings.nats_ingest_url,
                    password=password,
                    reconnect=self._reconnect,
                    on_message=self._ingest.handle,
                    warn=self._warn,
                )
                # Disconnects last, so what ingest stores on its way out is acknowledged.
                stack.push_async_callback(self._jetstream.close)
            await stack.enter_async_context(self._ingest)
            await self.sync_auth()
            if settings.broker_url is None:
                self._embedded = await stack.enter_async_context(self._embedded_broker())
                self._broker_url = self._embedded.url
                stack.callback(self._forget_embedded)  # runs before the broker stops
            await stack.enter_async_context(
                Housekeeping(self._engine, settings, self._warn, self._leads)
            )
            session = MqttSession(
                settings,
                broker_url=self._broker_url,
                password=password,
                mqtt5=self._wants_mqtt5(),
                reconnect=self._reconnect,
                on_message=self._ingest.handle,
                on_connect=self._on_connect,
                warn=self._warn,
                ingest=settings.nats_ingest_url is None,
            )
            self._publisher = DesiredPublisher(
                session,
                self._engine,
                sign_desired=self._sign_desired,
                retry_delay=self._reconnect.delay,
                warn=self._warn,
            )
            self._session = await stack.enter_async_context(session)
            if self._jetstream is not None:
                await stack.enter_async_context(self._jetstream)  # pulls from here on
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def _embedded_broker(self) -> EmbeddedBroker:
        settings = self._settings
        return EmbeddedBroker(
            host=settings.embedded_broker_host,
            port=settings.embedded_broker_port,
            password_file=settings.resolved_auth_dir / PASSWORD_FILE,
            controller_username=settings.broker_username,
        )

    def _forget_embedded(self) -> None:
        self._embedded = None

    def _wants_mqtt5(self) -> bool:
        """MQTT 5 for shared subscriptions, which the embedded broker (3.1.1) cannot do."""
        group = self._settings.shared_subscription_group
        if group is not None and self._embedded is not None:
            log.warning(
                "shared_subscription_group %r needs MQTT 5, and the embedded broker "
                "speaks MQTT 3.1.1 only: subscribing without shared subscriptions, so "
                "run a single controller replica (or use Mosquitto/EMQX/HiveMQ)",
                group,
            )
            return False
        return group is not None

    async def _on_connect(self) -> None:
        await self._publishing().republish_stored()

    def _publishing(self) -> DesiredPublisher:
        assert self._publisher is not None, "the link is not entered"
        return self._publisher

    # --- LinkPort ----------------------------------------------------------------------

    async def sync_auth(self) -> None:
        """Rewrite the broker's users from the database; make it reload.

        Returns once a sync that read the database after this call has written them.
        Calls that arrive while one runs share the next one: a burst of enrollments
        costs two rewrites and reloads, not one each (the broker reloads every user).
        Replicas sharing the files take turns (an advisory lock), so one that read the
        database earlier never writes over a newer file.
        """
        self._auth_wanted += 1
        wanted = self._auth_wanted
        async with self._auth_lock:
            if self._auth_done >= wanted:
                return  # a sync that began after this call wrote them
            covers = self._auth_wanted  # every call so far committed before this read
            async with advisory_lock(self._engine, BROKER_AUTH_LOCK):
                await self._load_and_write_auth()
            self._auth_done = covers

    async def _load_and_write_auth(self) -> None:
        credentials = await asyncio.to_thread(store.load_credentials, self._engine)
        self._ingest.install(credentials)
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
        await self._publishing().publish_desired(state)

    async def clear_desired(self, device_id: str) -> None:
        await self._publishing().clear_desired(device_id)

    async def send_command(self, command: Command) -> None:
        await self._publishing().send_command(command)

    def status(self) -> LinkStats:
        session, writer = self._session, self._ingest.writer
        connected = session is not None and session.connected
        return LinkStats(
            connected=connected,
            broker_url=self._broker_url,
            embedded_broker=self._settings.broker_url is None,
            received=self._ingest.received,
            stored=writer.stored,
            duplicates=writer.duplicates,
            rejected=sum(self._ingest.rejected.values()),
            rejected_by_reason=dict(self._ingest.rejected),
            protocol=session.protocol if session is not None else "3.1.1",
            shared_subscription=session is not None and session.shared,
            ingest=self._ingest_path(),
            backlog=writer.backlog,
            db_retries=writer.db_retries,
            overflowed=writer.overflowed,
            last_error=None if connected or session is None else session.last_error,
        )

    def _ingest_path(self) -> str:
        if self._jetstream is not None:
            return "jetstream" if self._jetstream.pulling else "jetstream-waiting"
        return "mqtt-shared" if self._session is not None and self._session.shared else "mqtt"

    async def wait_connected(self) -> None:
        """Wait until the session is up (wrap it in ``asyncio.timeout``)."""
        assert self._session is not None, "the link is not entered"
        await self._session.wait_connected()
