"""One simulated agent: its own MQTT session, speaking the real protocol, serving nothing.

A :class:`SimulatedDevice` connects with its enrolled credentials (client id and
username are the device id), leaves an ``offline`` event as its last will,
announces itself ``online``, subscribes to its own ``desired`` and ``cmd`` topics,
answers every new desired state with a retained :class:`~models.wire.ReportedState`
in which each desired model is ready (no model is loaded), answers ``report`` and
``reconcile`` commands the same way and ``flush`` with a sample, and publishes a
one-sample :class:`~models.wire.TelemetryBatch` on its slot of every interval.

Thousands of these share one asyncio loop: aiomqtt drives paho's socket from the
loop (``add_reader``/``add_writer``), so a device costs two small tasks and a
socket, never a thread. A lost connection is retried with jittered backoff until
:meth:`SimulatedDevice.stop`; stopping publishes ``offline`` and disconnects
cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiomqtt

from fleet.simulate.identity import SimulatedIdentity
from fleet.simulate.schedule import next_send
from fleet.simulate.telemetry import DeviceProfile, LoadState, next_sample, telemetry_payload
from models.topics import Channel, DeviceTopic
from models.wire import (
    Command,
    CommandKind,
    DesiredState,
    Event,
    EventKind,
    ModelState,
    ReportedModel,
    ReportedState,
    WireError,
    decode,
    encode,
)

__all__ = ["DeviceCounters", "DeviceTiming", "SimulatedDevice", "broker_address"]

_log = logging.getLogger(__name__)

# CONNACK codes that more attempts will not fix (MQTT 3.1.1: 4 bad credentials,
# 5 not authorised; MQTT 5: 134, 135). A few retries still happen, because the
# broker reloads its password file (SIGHUP) a moment after the enrollment returns.
_AUTH_CODES = frozenset({4, 5, 134, 135})
_AUTH_ATTEMPTS = 5


@dataclass
class DeviceCounters:
    """Shared by every device of a simulation; one asyncio loop, so plain ints suffice."""

    connected: int = 0  # sessions up now
    ever_connected: int = 0  # devices that connected at least once
    gave_up: int = 0  # devices that stopped trying (credentials refused)
    connect_attempts: int = 0
    disconnects: int = 0  # sessions lost (not counting the final clean disconnect)
    sent: int = 0  # telemetry batches handed to the socket (acknowledged or not)
    published: int = 0  # telemetry batches acknowledged by the broker (PUBACK)
    publish_failed: int = 0
    reports: int = 0  # reported states published
    desired: int = 0  # new desired states received
    commands: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # reason -> count


@dataclass(frozen=True)
class DeviceTiming:
    """When a device sends, and how it treats the broker."""

    base: float  # wall clock instant all slots count from (seconds since the epoch)
    offset: float  # this device's place in the interval, seconds
    interval: float  # seconds between samples
    keepalive: int = 60  # seconds
    connect_timeout: float = 30.0  # seconds for CONNECT -> CONNACK
    publish_timeout: float = 30.0  # seconds for PUBLISH -> PUBACK
    max_backoff: float = 30.0  # seconds between reconnect attempts, at most


def broker_address(url: str) -> tuple[str, int, bool]:
    """Host, port and whether to use TLS, from ``mqtt://host:port`` or ``mqtts://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ValueError(f"{url!r} is not a URL like mqtt://host:1883")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    """The numeric code of an aiomqtt error (paho hands out ``ReasonCode`` objects or ints)."""
    rc = exc.rc
    return rc if rc is None or isinstance(rc, int) else int(rc.value)


def _new_id() -> str:
    return uuid.uuid4().hex


class SimulatedDevice:
    """One simulated device; :meth:`run` until :meth:`stop`."""

    def __init__(
        self,
        identity: SimulatedIdentity,
        profile: DeviceProfile,
        *,
        timing: DeviceTiming,
        counters: DeviceCounters,
        connect_gate: asyncio.Semaphore,
        agent_version: str,
        broker_url: str | None = None,
        seed: int = 0,
    ) -> None:
        self.identity = identity
        self.profile = profile
        self.timing = timing
        self.counters = counters
        self.agent_version = agent_version
        self._gate = connect_gate
        self._broker_url = broker_url or identity.broker.url
        self._rng = random.Random(f"{seed}:{identity.index}:telemetry")  # noqa: S311 (not secret)
        self._load = LoadState()
        self.seq = identity.next_seq
        self.desired_version: int | None = None
        self._desired_models: list[ReportedModel] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._ever_connected = False
        device_id = identity.device_id
        self._topics = {ch: str(DeviceTopic(device_id, ch)) for ch in Channel}

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to publish ``offline``, disconnect and return."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()

    async def run(self) -> None:
        """Connect, serve the session, reconnect after losses; return after :meth:`stop`."""
        backoff = 1.0
        auth_failures = 0
        while not self._stopping:
            try:
                await self._session()
                backoff = 1.0
            except aiomqtt.MqttCodeError as exc:
                self._note_error(exc)
                if _code(exc) in _AUTH_CODES:
                    auth_failures += 1
                    if auth_failures >= _AUTH_ATTEMPTS:
                        self.counters.gave_up += 1
                        _log.debug("%s: broker refused credentials", self.identity.device_id)
                        return
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                self._note_error(exc)
            except Exception as exc:  # a bug must not end one device of thousands silently
                self._note_error(exc)
                _log.warning("%s: unexpected error", self.identity.device_id, exc_info=True)
            if self._stopping:
                return
            delay = backoff * self._rng.uniform(0.5, 1.5)
            backoff = min(backoff * 2, self.timing.max_backoff)
            self._tasks = [asyncio.ensure_future(asyncio.sleep(delay))]
            await asyncio.wait(self._tasks)  # stop() cancels the sleep
            self._tasks = []

    def _note_error(self, exc: BaseException) -> None:
        reason = type(exc).__name__
        if isinstance(exc, aiomqtt.MqttCodeError):
            reason = f"{reason}({_code(exc)})"
        self.counters.errors[reason] += 1

    def _client(self) -> aiomqtt.Client:
        host, port, tls = broker_address(self._broker_url)
        broker = self.identity.broker
        tls_context = None
        if tls:
            tls_context = ssl.create_default_context(cadata=broker.ca_pem or None)
        offline = Event(
            device_id=self.identity.device_id,
            id=_new_id(),
            kind=EventKind.OFFLINE,
            message="connection lost (last will)",
        )
        return aiomqtt.Client(
            host,
            port,
            username=broker.username,
            password=broker.password,
            identifier=broker.client_id,
            will=aiomqtt.Will(self._topics[Channel.EVENTS], encode(offline), qos=1),
            clean_session=True,
            keepalive=self.timing.keepalive,
            timeout=self.timing.connect_timeout,
            tls_context=tls_context,
        )

    async def _session(self) -> None:
        client = self._client()
        async with contextlib.AsyncExitStack() as stack:
            async with self._gate:
                if self._stopping:
                    return
                self.counters.connect_attempts += 1
                await stack.enter_async_context(client)
            self._set_connected(True)
            try:
                await self._serve(client)
            finally:
                self._set_connected(False)
            if self._stopping:
                await self._goodbye(client)

    def _set_connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            self.counters.connected += 1
            if not self._ever_connected:
                self._ever_connected = True
                self.counters.ever_connected += 1
        else:
            self.counters.connected -= 1
            if not self._stopping:
                self.counters.disconnects += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        timeout = self.timing.publish_timeout
        await client.subscribe(
            [(self._topics[Channel.DESIRED], 1), (self._topics[Channel.CMD], 1)], timeout=timeout
        )
        await self._publish_event(client, EventKind.ONLINE, "simulated agent online")
        await self._publish_report(client)
        self._tasks = [
            asyncio.create_task(self._telemetry_loop(client)),
            asyncio.create_task(self._message_loop(client)),
        ]
        if self._stopping:  # stop() came while subscribing: it found no tasks to cancel
            for task in self._tasks:
                task.cancel()
        try:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in self._tasks:
                task.cancel()
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if not self._stopping:
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    raise result
            raise aiomqtt.MqttError("session ended")

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """A clean shutdown: say ``offline`` (a clean DISCONNECT does not fire the will)."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await self._publish_event(client, EventKind.OFFLINE, "simulated agent stopped")

    # --- what the device says --------------------------------------------------------------

    async def _publish_event(self, client: aiomqtt.Client, kind: EventKind, message: str) -> None:
        event = Event(device_id=self.identity.device_id, id=_new_id(), kind=kind, message=message)
        await client.publish(
            self._topics[Channel.EVENTS], encode(event), qos=1, timeout=self.timing.publish_timeout
        )

    def reported_state(self) -> ReportedState:
        return ReportedState(
            device_id=self.identity.device_id,
            desired_version=self.desired_version,
            converged=True,
            models=self._desired_models,
            agent_version=self.agent_version,
        )

    async def _publish_report(self, client: aiomqtt.Client) -> None:
        await client.publish(
            self._topics[Channel.REPORTED],
            encode(self.reported_state()),
            qos=1,
            retain=True,
            timeout=self.timing.publish_timeout,
        )
        self.counters.reports += 1

    async def _publish_sample(self, client: aiomqtt.Client) -> None:
        now = datetime.now(UTC)
        sample, self._load = next_sample(
            self.profile,
            self._load,
            self._rng,
            sample_id=_new_id(),
            seq=self.seq,
            ts=now,
            window_s=self.timing.interval,
        )
        self.seq += 1
        payload = telemetry_payload(self.identity.device_id, _new_id(), now, sample)
        self.counters.sent += 1
        try:
            await client.publish(
                self._topics[Channel.TELEMETRY],
                payload,
                qos=1,
                timeout=self.timing.publish_timeout,
            )
        except (aiomqtt.MqttError, TimeoutError):
            self.counters.publish_failed += 1
            raise
        self.counters.published += 1

    async def _telemetry_loop(self, client: aiomqtt.Client) -> None:
        timing = self.timing
        while True:
            now = time.time()
            await asyncio.sleep(next_send(timing.base, timing.offset, timing.interval, now) - now)
            await self._publish_sample(client)

    # --- what the device hears -------------------------------------------------------------

    async def _message_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            if message.topic.value == self._topics[Channel.DESIRED]:
                await self._on_desired(client, bytes(payload))
            elif message.topic.value == self._topics[Channel.CMD]:
                await self._on_command(client, bytes(payload))

    async def _on_desired(self, client: aiomqtt.Client, payload: bytes) -> None:
        if not payload:
            return  # the retained state was cleared
        try:
            # Simulated devices measure the controller, not device trust: the director's
            # signature is not checked here (the real agent checks it, models.director).
            state = decode(DesiredState, _envelope_payload(payload))
        except WireError as exc:
            _log.warning("%s: ignoring desired state: %s", self.identity.device_id, exc)
            return
        if state.device_id != self.identity.device_id:
            return
        if self.desired_version is not None and state.version <= self.desired_version:
            return  # a replay or a reordered older state
        self.counters.desired += 1
        self.desired_version = state.version
        gpu = self.profile.gpu
        self._desired_models = [
            ReportedModel(
                name=model.name,
                version=model.version,
                state=ModelState.READY,
                runtime="onnxruntime" if "minilm" in model.name else "llama.cpp",
                device="cuda:0" if gpu else "cpu",
                memory_bytes=self.profile.model_memory_bytes // max(1, len(state.models)),
            )
            for model in state.models
        ]
        await self._publish_report(client)

    async def _on_command(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            command = decode(Command, payload)
        except WireError as exc:
            _log.warning("%s: ignoring command: %s", self.identity.device_id, exc)
            return
        if command.device_id != self.identity.device_id:
            return
        self.counters.commands += 1
        if command.kind in {CommandKind.REPORT, CommandKind.RECONCILE}:
            await self._publish_report(client)
        elif command.kind is CommandKind.FLUSH:
            await self._publish_sample(client)


def _envelope_payload(raw: bytes) -> bytes:
    """The payload of a DSSE envelope, unverified; :class:`WireError` if it is not one."""
    try:
        data = json.loads(raw)
        return base64.b64decode(data["payload"], validate=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise WireError(f"not a signed desired state: {exc!r}") from None
