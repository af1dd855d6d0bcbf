"""The embedded MQTT broker: amqtt in-process, with the same logins and ACL as Mosquitto.

When ``settings.broker_url`` is None the controller runs amqtt's broker on
``embedded_broker_host:embedded_broker_port``, so one command gives a working fleet.
Authentication and authorization come from :class:`EdgefleetBrokerPlugin`, loaded
through amqtt's ``plugins`` configuration: it reads the very ``password_file`` the
controller writes for Mosquitto (re-read whenever the file changes), verifies
passwords with :func:`fleet.link.passwords.verify_password`, and asks
:func:`fleet.link.acl.acl_allows` about every publish, subscribe and delivery. A
user no longer in the file (a revoked device) is denied everything at once, and
:meth:`EmbeddedBroker.disconnect_unauthorized` drops its connection.

amqtt 0.12 speaks MQTT 3.1.1 only, and needs repairs, made in
:class:`_EdgefleetBroker` (docs/broker.md has the details):

- it hands a (re)connecting client the retained messages of *every* client's
  subscriptions, unchecked; here a client only gets retained messages on its own
  subscriptions that the ACL lets it read;
- it looks up, and with ``clean_session`` deletes, the stored session named by the
  client id before it checks the password, so anyone could knock the controller's
  session off by connecting with its client id; here the password comes first;
- it waits forever for a CONNECT (an MQTT 5 one, which it misreads, or none at all);
  here the CONNECT must come within 10 s, and MQTT 5 is refused at once;
- it drops QoS 1 messages it has acknowledged but not yet forwarded when their
  sender disconnects; here they are forwarded first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.adapters import (  # type: ignore[import-untyped]
    BufferReader,
    ReaderAdapter,
    WriterAdapter,
)
from amqtt.broker import Broker, BrokerContext  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError  # type: ignore[import-untyped]
from amqtt.mqtt.connack import (  # type: ignore[import-untyped]
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from amqtt.session import Session  # type: ignore[import-untyped]
from amqtt.utils import format_client_message, gen_client_id  # type: ignore[import-untyped]

from fleet.errors import ConfigError
from fleet.link.acl import Access, acl_allows, parse_password_file
from fleet.link.passwords import verify_password

__all__ = ["EdgefleetBrokerPlugin", "EmbeddedBroker", "PasswordTable"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # a disconnected persistent session is forgotten after this
CONNECT_TIMEOUT_S = 10.0  # a new connection must send its whole CONNECT within this
MAX_CONNECT_BYTES = 64 * 1024
MQTT_311 = 4  # the CONNECT protocol level of MQTT 3.1.1

_ACCESS = {
    Action.PUBLISH: Access.WRITE,
    Action.SUBSCRIBE: Access.SUBSCRIBE,
    Action.RECEIVE: Access.READ,
}


class PasswordTable:
    """The ``user -> hash`` lines of a password file, re-read whenever the file changes.

    The file is checked (one ``stat``: mtime, inode, size) at most every ``recheck_s``
    seconds, and at once after :meth:`invalidate`, which the controller calls right
    after it rewrites the file. The controller replaces the file by renaming, so a new
    inode always means new content. A missing or unreadable file means no users at
    all: everyone is refused.
    """

    def __init__(self, path: Path, *, recheck_s: float = 1.0) -> None:
        self.path = path
        self._recheck_s = recheck_s
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def invalidate(self) -> None:
        """Look at the file again on the next lookup."""
        self._next_check = 0.0

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._recheck_s
        try:
            st = self.path.stat()
        except OSError:
            if self._stamp is not None:
                log.warning("broker password file %s is gone: refusing every login", self.path)
            self._stamp, self._users = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp:
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            log.warning("cannot read broker password file %s: %s", self.path, exc)
            self._stamp, self._users = None, {}
            return
        self._stamp, self._users = stamp, parse_password_file(text.splitlines())

    def users(self) -> Mapping[str, str]:
        self._refresh()
        return self._users

    def hash_of(self, username: str) -> str | None:
        return self.users().get(username)


def _password_text(password: Any) -> str | None:
    if isinstance(password, bytes | bytearray):
        try:
            return bytes(password).decode()
        except UnicodeDecodeError:
            return None
    return password if isinstance(password, str) else None


class EdgefleetBrokerPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """amqtt authentication and topic plugin enforcing :mod:`fleet.link.acl`."""

    @dataclass
    class Config:
        password_file: str = ""  # Mosquitto-format password file the controller writes
        controller_username: str = "edgefleet-controller"

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        config = context.config
        if not isinstance(config, EdgefleetBrokerPlugin.Config) or not config.password_file:
            raise ConfigError("EdgefleetBrokerPlugin needs a password_file")
        self.controller = config.controller_username
        self.table = PasswordTable(Path(config.password_file))

    def allowed(self, username: str | None, topic: str, access: Access) -> bool:
        """The ACL, for a user who is still in the password file."""
        if not username or self.table.hash_of(username) is None:
            return False
        return acl_allows(username, topic, access, controller=self.controller)

    async def authenticate(self, *, session: Session) -> bool:
        username = session.username
        password = _password_text(session.password)
        hashed = self.table.hash_of(username) if username else None
        if hashed is None or password is None or not verify_password(password, hashed):
            log.info(
                "embedded broker: refused login %r (%s)", username, format_client_message(session)
            )
            return False
        if username != self.controller and session.client_id != username:
            # Devices connect with their id as client id (enrollment hands it out), so
            # no device can take over, or knock off, another device's session.
            log.info("embedded broker: refused %r: client id %r", username, session.client_id)
            return False
        if session.will_flag and not acl_allows(
            username, session.will_topic or "", Access.WRITE, controller=self.controller
        ):
            log.info("embedded broker: refused %r: last will on a topic it may not write", username)
            return False
        return True

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        access = _ACCESS.get(action)
        return access is not None and self.allowed(session.username, topic, access)


async def _read_connect(reader: ReaderAdapter) -> bytes:
    """The first packet, whole: fixed header, remaining length, body (at most 64 KiB)."""
    head: bytes = await reader.read(1)
    if not head or head[0] >> 4 != 1:
        raise ValueError("the first packet is not a CONNECT")
    encoded = b""
    length = 0
    for shift in (0, 7, 14, 21):
        byte: bytes = await reader.read(1)
        encoded += byte
        length += (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    if length > MAX_CONNECT_BYTES:
        raise ValueError(f"CONNECT of {length} bytes")
    body: bytes = await reader.read(length) if length else b""
    return head + encoded + body


def _protocol_level(raw: bytes) -> int | None:
    """The protocol level of a whole CONNECT packet (4 is MQTT 3.1.1, 5 is MQTT 5)."""
    start = 1
    while raw[start] & 0x80:
        start += 1
    body = raw[start + 1 :]
    if len(body) < 3:
        return None
    name_length = int.from_bytes(body[:2], "big")
    return body[2 + name_length] if len(body) > 2 + name_length else None


async def _close(writer: WriterAdapter) -> None:
    with contextlib.suppress(Exception):
        await writer.close()


class _EdgefleetBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the repairs the module docstring describes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connecting: set[WriterAdapter] = set()  # connections still sending CONNECT

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12.1's own version, with three changes: CONNECT must arrive within
        # CONNECT_TIMEOUT_S and be MQTT 3.1.1 (an MQTT 5 CONNECT gets the 3.1.1 refusal
        # at once, instead of amqtt misreading it and waiting forever), and the password
        # is checked before any stored session is looked up or deleted.
        where = format_client_message(address=remote_address, port=remote_port)
        self._connecting.add(writer)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                raw = await _read_connect(reader)
        except (TimeoutError, EOFError, OSError, ValueError) as exc:
            await _close(writer)
            raise AMQTTError(f"{where}: no valid CONNECT: {exc or type(exc).__name__}") from None
        finally:
            self._connecting.discard(writer)
        level = _protocol_level(raw)
        if level != MQTT_311:
            writer.write(bytes([0x20, 0x02, 0x00, UNACCEPTABLE_PROTOCOL_VERSION]))
            await _close(writer)
            raise MQTTError(f"{where}: MQTT protocol level {level} refused (3.1.1 only)")
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(
                BufferReader(raw), writer, self.plugins_manager
            )
        except (AMQTTError, MQTTError, NoDataError) as exc:
            await _close(writer)
            raise MQTTError(f"{where}: invalid CONNECT: {exc}") from exc

        if not await self._authenticate(client_session, self.listeners_config["default"]):
            writer.write(bytes([0x20, 0x02, 0x00, NOT_AUTHORIZED]))
            await _close(writer)
            raise MQTTError(f"{where}: not authorized")

        if client_session.clean_session:
            if client_session.client_id:
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.will_retain = client_session.will_retain
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0

        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        # amqtt 0.12.1's own loop, but when the client disconnects, first forward the QoS 1
        # messages amqtt has already acknowledged: amqtt dropped them (an agent's last
        # event before a clean shutdown, say). In order: the one the delivery task took
        # (if it took one), then the rest of the queue.
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        try:
            while True:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_subscription()
                    )
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_unsubscription()
                    )
                if disconnect_waiter in done:
                    await self._deliver_the_rest(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    return
                if wait_deliver in done:
                    if not await self._handle_message_delivery(
                        client_session, handler, wait_deliver
                    ):
                        return
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        except asyncio.CancelledError:
            log.debug("embedded broker: client loop of %s cancelled", client_session.client_id)
        finally:
            pending = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver_the_rest(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> None:
        if not wait_deliver.done():
            wait_deliver.cancel()  # a queue.get() cancelled before it returns leaves the item
            await asyncio.gather(wait_deliver, return_exceptions=True)
        took = (
            wait_deliver.done()
            and not wait_deliver.cancelled()
            and wait_deliver.exception() is None
            and wait_deliver.result() is not None
        )
        if took:
            await self._handle_message_delivery(client_session, handler, wait_deliver)
        queue = client_session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            delivered = loop.create_future()
            delivered.set_result(queue.get_nowait())
            await self._handle_message_delivery(client_session, handler, delivered)

    async def shutdown(self) -> None:
        for writer in list(self._connecting):
            await _close(writer)  # their CONNECT reads fail at once, and end cleanly
        await super().shutdown()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, _ = subscription
        granted = next(
            (
                qos
                for holder, qos in self._subscriptions.get(topic_filter, [])
                if holder.client_id == session.client_id
            ),
            None,
        )
        handler = self._get_handler(session)
        if granted is None or handler is None:
            return  # not this session's subscription: nothing of it is for this client
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            qos = granted if retained.qos is None else min(granted, retained.qos)
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, qos, retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def disconnect_unauthorized(self, table: PasswordTable) -> list[str]:
        """Drop every connected client whose user is no longer in ``table``."""
        users = table.users()
        dropped = []
        for client_id, (session, handler) in list(self._sessions.items()):
            if session.transitions.state != "connected":
                continue
            if session.username in users:
                continue
            dropped.append(client_id)
            await handler.handle_connection_closed()
        return dropped


class EmbeddedBroker:
    """amqtt listening on ``host:port``, checked against ``password_file``; an async context."""

    def __init__(
        self, *, host: str, port: int, password_file: Path, controller_username: str
    ) -> None:
        self.host = host
        self._requested_port = port
        self.password_file = password_file
        self.controller_username = controller_username
        self._table = PasswordTable(password_file)
        self._broker: _EdgefleetBroker | None = None
        self.port = port

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self._requested_port}"}
            },
            "session_expiry_interval": SESSION_EXPIRY_S,
            "plugins": {
                f"{__name__}.EdgefleetBrokerPlugin": {
                    "password_file": str(self.password_file),
                    "controller_username": self.controller_username,
                }
            },
        }

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0"):  # noqa: S104 - a client connects to loopback
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"mqtt://{host}:{self.port}" if ":" not in host else f"mqtt://[{host}]:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        broker = _EdgefleetBroker(self._config())
        try:
            await broker.start()
        except BrokerError as exc:
            raise ConfigError(
                f"cannot start the embedded MQTT broker on {self.host}:{self._requested_port}: "
                f"{exc.__cause__ or exc}"
            ) from exc
        self._broker = broker
        plugin = broker.plugins_manager.get_plugin(EdgefleetBrokerPlugin.__name__)
        if isinstance(plugin, EdgefleetBrokerPlugin):
            self._table = plugin.table  # one cache, so invalidate() reaches the checks
        server = broker._servers.get("default")  # amqtt has no public getter
        sockets = getattr(getattr(server, "instance", None), "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def disconnect_unauthorized(self) -> list[str]:
        """Cut off clients whose user left the password file (revoked devices)."""
        if self._broker is None:
            return []
        self._table.invalidate()
        dropped = await self._broker.disconnect_unauthorized(self._table)
        if dropped:
            log.info("embedded broker: disconnected %d revoked client(s)", len(dropped))
        return dropped
