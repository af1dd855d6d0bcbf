"""One simulated agent: its own MQTT session, speaking the real protocol, serving nothing.

A :class:`SimulatedDevice` connects with its enrolled credentials (client id and
username are the device id), leaves an ``offline`` event as its last will,
announces itself ``online``, subscribes to its own ``desired`` and ``cmd`` topics,
answers every new desired state with a retained :class:`~models.wire.ReportedState`,
answers ``report`` and ``reconcile`` commands the same way and ``flush`` with a
sample, and publishes a one-sample :class:`~models.wire.TelemetryBatch` on its slot of
every interval.

**Updates, as the agent does them.** A desired model whose ``target`` is not the file
the device serves (:mod:`.update`) is downloaded, installed and health-checked on a
timer (:attr:`DeviceTiming.update_s`, jittered): then ``update_verified``,
``update_installed`` and ``update_healthy``, and from then on the device reports the
target's version and sha256. Until then it keeps reporting the old version as ready.
A newer desired state that wants another target (or none) pre-empts a download in
flight: one ``update_failed`` with ``phase`` "download" and ``superseded`` true, at
severity info. Regression rules (:mod:`.regress`) can make the install fail
(``update_failed``, phase "install"), the health check fail (``update_rolled_back``;
the old version serves on) or the agent restart (an ``online`` event), and change the
telemetry of whatever version is served. A failed target is not tried again for the
same desired state, as the agent's updater refuses it; a newer desired state tries
again. No ``update_progress`` events: the download is a timer.

**Offline on purpose.** :meth:`SimulatedDevice.go_offline` takes a device off the
broker (:class:`OfflineMode`: cut the connection so the broker publishes the last
will, or say ``offline`` and disconnect, or disconnect without a word) and keeps it
off until :meth:`SimulatedDevice.go_online`; updates in flight stop as on a power cut
and resume from the desired state it holds when it comes back.

Thousands of these share one asyncio loop: aiomqtt drives paho's socket from the
loop (``add_reader``/``add_writer``), so a device costs two small tasks and a
socket (and one more task while an update runs), never a thread. A lost connection
is retried with jittered backoff until :meth:`SimulatedDevice.stop`; stopping
publishes ``offline`` and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from fleet.simulate.identity import SimulatedIdentity
from fleet.simulate.regress import NO_EFFECTS, Effects, RegressionRules
from fleet.simulate.schedule import next_send
from fleet.simulate.telemetry import DeviceProfile, LoadState, next_sample, telemetry_payload
from fleet.simulate.update import (
    ServedModel,
    UpdateEvent,
    install,
    reported_models,
    superseded,
    updates_needed,
    with_untargeted,
)
from models.topics import Channel, DeviceTopic
from models.wire import (
    Command,
    CommandKind,
    DesiredState,
    Event,
    EventKind,
    ReportedState,
    WireError,
    decode,
    encode,
)

__all__ = ["DeviceCounters", "DeviceTiming", "OfflineMode", "SimulatedDevice", "broker_address"]

_log = logging.getLogger(__name__)

# CONNACK codes that more attempts will not fix (MQTT 3.1.1: 4 bad credentials,
# 5 not authorised; MQTT 5: 134, 135). A few retries still happen, because the
# broker reloads its password file (SIGHUP) a moment after the enrollment returns.
_AUTH_CODES = frozenset({4, 5, 134, 135})
_AUTH_ATTEMPTS = 5

_ONLINE = UpdateEvent(EventKind.ONLINE, "simulated agent online", {})
_STOPPED = UpdateEvent(EventKind.OFFLINE, "simulated agent stopped", {})


@dataclass
class DeviceCounters:
    """Shared by every device of a simulation; one asyncio loop, so plain ints suffice."""

    connected: int = 0  # sessions up now
    ever_connected: int = 0  # devices that connected at least once
    gave_up: int = 0  # devices that stopped trying (credentials refused)
    connect_attempts: int = 0
    disconnects: int = 0  # sessions lost (not counting clean disconnects or going offline)
    sent: int = 0  # telemetry batches handed to the socket (acknowledged or not)
    published: int = 0  # telemetry batches acknowledged by the broker (PUBACK)
    publish_failed: int = 0
    reports: int = 0  # reported states published
    desired: int = 0  # new desired states received
    commands: int = 0
    events: int = 0  # events published (online, offline, update_*)
    updates_started: int = 0  # downloads begun (again after a reconnect)
    updated: int = 0  # updates that ended healthy
    rolled_back: int = 0  # health check failed
    update_failed: int = 0  # install failed
    superseded: int = 0  # downloads pre-empted by a newer desired state
    offline: int = 0  # devices taken offline on purpose, now
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
    update_s: float = 0.2  # seconds an update takes (download, install, health check)
    update_jitter: float = 0.5  # each update takes update_s x (1 ± this), drawn uniformly


class OfflineMode(StrEnum):
    """How :meth:`SimulatedDevice.go_offline` leaves the broker."""

    DROP = "drop"  # cut the connection: the broker publishes the last will (offline)
    CLEAN = "clean"  # publish offline, then DISCONNECT, as a shutdown does
    SILENT = "silent"  # DISCONNECT without a word: only missed heartbeats tell


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


@dataclass
class _Update:
    """An update in flight: the target's model, and the task that will install it."""

    model: ServedModel
    task: asyncio.Task[None]


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
        models: Iterable[ServedModel] = (),
        rules: RegressionRules | None = None,
    ) -> None:
        self.identity = identity
        self.profile = profile
        self.timing = timing
        self.counters = counters
        self.agent_version = agent_version
        self.rules = rules or RegressionRules()
        self.served: dict[str, ServedModel] = {model.name: model for model in models}
        self.desired: DesiredState | None = None
        self._gate = connect_gate
        self._broker_url = broker_url or identity.broker.url
        self._rng = random.Random(f"{seed}:{identity.index}:telemetry")  # noqa: S311 (not secret)
        self._load = LoadState()
        self.seq = identity.next_seq
        self._effects: Effects = NO_EFFECTS
        self._updates: dict[str, _Update] = {}  # downloads in flight, by model name
        self._update_tasks: set[asyncio.Task[None]] = set()  # those, and any still reporting
        # model name -> (desired version, target sha256, why): not tried again for that state
        self._refused: dict[str, tuple[int, str, str]] = {}
        self._stopping = False
        self._want_online = True
        self._offline_mode = OfflineMode.DROP
        self._left = False  # go_offline ended (or will end) the session: reconnect at once
        self._tasks: list[asyncio.Future[Any]] = []
        self._client: aiomqtt.Client | None = None
        self._connected = False
        self._ever_connected = False
        self._resume = asyncio.Event()  # set while the device should be online
        self._resume.set()
        self._ready = asyncio.Event()  # a session is up, subscribed and has reported
        self._down = asyncio.Event()  # no session is up
        self._down.set()
        self._finished = asyncio.Event()  # run() has returned
        device_id = identity.device_id
        self._topics = {ch: str(DeviceTopic(device_id, ch)) for ch in Channel}
        self._refresh()

    # --- what the test or the runner asks ----------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    @property
    def desired_version(self) -> int | None:
        """The last desired state acted on (None: never received one)."""
        return self.desired.version if self.desired is not None else None

    @property
    def connected(self) -> bool:
        """Whether an MQTT session is up now."""
        return self._connected

    @property
    def online(self) -> bool:
        """Whether the device is meant to be online (not taken off by :meth:`go_offline`)."""
        return self._want_online

    @property
    def effects(self) -> Effects:
        """What the served model versions do to this device's telemetry now."""
        return self._effects

    @property
    def updating(self) -> dict[str, ServedModel]:
        """The updates in flight: model name -> the version being installed."""
        return {name: update.model for name, update in self._updates.items()}

    def stop(self) -> None:
        """Ask :meth:`run` to publish ``offline``, disconnect and return."""
        self._stopping = True
        self._resume.set()
        for task in self._tasks:
            task.cancel()

    def go_offline(self, mode: OfflineMode | str = OfflineMode.DROP) -> None:
        """Leave the broker as ``mode`` says and stay off until :meth:`go_online`.

        Returns at once; :meth:`wait_down` waits until the session has ended. Updates
        in flight stop, as on a power cut, and resume when the device is back.
        """
        mode = OfflineMode(mode)
        if not self._want_online or self._stopping:
            return
        self._want_online = False
        self._left = True
        self._offline_mode = mode
        self._resume.clear()
        self.counters.offline += 1
        client = self._client
        if mode is OfflineMode.DROP and client is not None:
            _cut(client)  # no DISCONNECT can follow: the broker sees the connection drop
        for task in self._tasks:  # including a publish that would wait for its PUBACK
            task.cancel()

    def go_online(self) -> None:
        """Come back after :meth:`go_offline`: connect, announce, and reconcile again."""
        if self._want_online:
            return
        self._want_online = True
        self.counters.offline -= 1
        self._resume.set()

    async def wait_ready(self) -> bool:
        """Wait until a session is up and has reported; False if :meth:`run` ended first."""
        return await self._first(self._ready)

    async def wait_down(self) -> bool:
        """Wait until no session is up; False if :meth:`run` ended first."""
        return await self._first(self._down)

    async def wait_updates(self) -> None:
        """Wait until no update is in flight: each installed, failed, or was superseded."""
        while self._update_tasks:
            await asyncio.wait(list(self._update_tasks))

    async def _first(self, event: asyncio.Event) -> bool:
        if event.is_set():
            return True
        if self._finished.is_set():
            return False
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._finished.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return event.is_set()

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve the session, reconnect after losses; return after :meth:`stop`."""
        try:
            await self._run()
        finally:
            self._finished.set()

    async def _run(self) -> None:
        backoff = 1.0
        auth_failures = 0
        while not self._stopping:
            if not self._want_online:
                self._left = False
                await self._pause(self._resume.wait())
                continue
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
            if self._left:  # taken offline on purpose: wait for go_online, then no backoff
                self._left = False
                backoff = 1.0
                continue
            delay = backoff * self._rng.uniform(0.5, 1.5)
            backoff = min(backoff * 2, self.timing.max_backoff)
            await self._pause(asyncio.sleep(delay))  # stop() cancels the sleep

    async def _pause(self, wait: Coroutine[Any, Any, Any]) -> None:
        """Await ``wait`` in a task that :meth:`stop` and :meth:`go_offline` can cancel."""
        self._tasks = [asyncio.ensure_future(wait)]
        await asyncio.wait(self._tasks)
        self._tasks = []

    def _note_error(self, exc: BaseException) -> None:
        if not self._want_online:
            return  # the connection was cut on purpose
        reason = type(exc).__name__
        if isinstance(exc, aiomqtt.MqttCodeError):
            reason = f"{reason}({_code(exc)})"
        self.counters.errors[reason] += 1

    def _client_for_session(self) -> aiomqtt.Client:
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
        client = self._client_for_session()
        async with contextlib.AsyncExitStack() as stack:
            async with self._gate:
                if self._stopping or not self._want_online:
                    return
                self.counters.connect_attempts += 1
                await stack.enter_async_context(client)
            self._set_connected(True)
            self._client = client
            try:
                await self._serve(client)
            finally:
                self._client = None
                self._cancel_updates()
                self._ready.clear()
                self._set_connected(False)
            mode = None if self._want_online else self._offline_mode
            if self._stopping or mode is OfflineMode.CLEAN:
                await self._goodbye(client)
            elif mode is OfflineMode.DROP:
                await self._until_lost(client)

    def _set_connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            self._down.clear()
            self.counters.connected += 1
            if not self._ever_connected:
                self._ever_connected = True
                self.counters.ever_connected += 1
        else:
            self._down.set()
            self.counters.connected -= 1
            if not self._stopping and self._want_online:
                self.counters.disconnects += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        timeout = self.timing.publish_timeout
        granted = await client.subscribe(
            [(self._topics[Channel.DESIRED], 1), (self._topics[Channel.CMD], 1)], timeout=timeout
        )
        if any(getattr(code, "value", code) >= 0x80 for code in granted):  # as the agent does
            raise aiomqtt.MqttError(f"subscriptions refused: {granted}")
        await self._publish_event(client, _ONLINE)
        self._reconcile(client)  # updates a lost session or a power cut interrupted
        await self._publish_report(client)
        self._tasks = [
            asyncio.create_task(self._telemetry_loop(client)),
            asyncio.create_task(self._message_loop(client)),
        ]
        self._ready.set()
        if self._stopping or not self._want_online:
            # stop() or go_offline() came while subscribing: they found no tasks to cancel
            if self._offline_mode is OfflineMode.DROP and not self._stopping:
                _cut(client)
            for task in self._tasks:
                task.cancel()
        try:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in self._tasks:
                task.cancel()
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._stopping or not self._want_online:
            return
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        raise aiomqtt.MqttError("session ended")

    async def _until_lost(self, client: aiomqtt.Client) -> None:
        """After a cut, wait (briefly) until the client has noticed the connection is gone.

        Its messages iterator then raises the loss, and nothing is left unretrieved.
        """
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self.timing.connect_timeout):
                async for _message in client.messages:
                    pass  # a device that is off hears nothing

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """A clean shutdown: say ``offline`` (a clean DISCONNECT does not fire the will)."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await self._publish_event(client, _STOPPED)

    # --- what the device says --------------------------------------------------------------

    async def _publish_event(self, client: aiomqtt.Client, event: UpdateEvent) -> None:
        message = Event(
            device_id=self.identity.device_id,
            id=_new_id(),
            kind=event.kind,
            severity=event.severity,
            message=event.message,
            data=event.data,
        )
        await client.publish(
            self._topics[Channel.EVENTS],
            encode(message),
            qos=1,
            timeout=self.timing.publish_timeout,
        )
        self.counters.events += 1

    def reported_state(self) -> ReportedState:
        failed = {}
        if self.desired is not None:
            failed = {
                name: why
                for name, (version, _sha, why) in self._refused.items()
                if version == self.desired.version
            }
        models, converged = reported_models(
            self.desired,
            self.served,
            failed,
            device="cuda:0" if self.profile.gpu else "cpu",
            memory_bytes=self.profile.model_memory_bytes,
        )
        return ReportedState(
            device_id=self.identity.device_id,
            desired_version=self.desired_version,
            converged=converged,
            models=models,
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
            effects=self._effects,
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
        if self.desired is not None and state.version <= self.desired.version:
            return  # a replay or a reordered older state
        self.counters.desired += 1
        self.desired = state
        await self._preempt(client, state)
        self._reconcile(client)
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

    # --- updates ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Recompute what the served versions do to telemetry (after the store changed)."""
        if not self.rules:
            self._effects = NO_EFFECTS
            return
        if self.desired is None:
            serving = list(self.served.values())
        else:
            names = {model.name for model in self.desired.models}
            serving = [model for name, model in self.served.items() if name in names]
        self._effects = self.rules.serving(model.key for model in serving)

    def _reconcile(self, client: aiomqtt.Client) -> None:
        """Start an update for each desired target the store lacks (unless refused)."""
        desired = self.desired
        if desired is None:
            return
        self.served = with_untargeted(desired, self.served)
        for wanted in updates_needed(desired, self.served):
            target = wanted.target
            assert target is not None
            if wanted.name in self._updates:
                continue  # the same target: _preempt cancelled any other
            refused = self._refused.get(wanted.name)
            if refused is not None and refused[:2] == (desired.version, target.sha256):
                continue
            model = ServedModel.from_target(wanted)
            task = asyncio.create_task(self._update(client, model))
            self._update_tasks.add(task)
            task.add_done_callback(self._update_tasks.discard)
            self._updates[wanted.name] = _Update(model, task)
            self.counters.updates_started += 1
        self._refresh()

    async def _preempt(self, client: aiomqtt.Client, state: DesiredState) -> None:
        """Cancel the downloads ``state`` no longer wants; say so once for each."""
        wanted = {model.name: model for model in state.models}
        for name, update in list(self._updates.items()):
            target = wanted[name].target if name in wanted else None
            if target is not None and target.sha256 == update.model.sha256:
                continue  # still wanted: the download goes on
            update.task.cancel()
            del self._updates[name]
            self.counters.superseded += 1
            await self._publish_event(client, superseded(update.model, state.version))

    def _update_delay(self) -> float:
        timing = self.timing
        if timing.update_s <= 0:
            return 0.0
        jitter = min(max(timing.update_jitter, 0.0), 1.0)
        return timing.update_s * self._rng.uniform(1 - jitter, 1 + jitter)

    async def _update(self, client: aiomqtt.Client, model: ServedModel) -> None:
        """One update: wait out the download, then install, check and report, as the agent."""
        delay = self._update_delay()
        if delay > 0:
            await asyncio.sleep(delay)
        # From here on nothing pre-empts it: decide, change the store, then tell.
        self._updates.pop(model.name, None)
        outcome = install(model, self.rules.effects_for(*model.key))
        if outcome.result == "healthy":
            self.served[model.name] = model
            self._refused.pop(model.name, None)
            self.counters.updated += 1
        else:
            key = (self.desired_version or 0, model.sha256 or "", outcome.reason or "")
            self._refused[model.name] = key
            if outcome.result == "rolled_back":
                self.counters.rolled_back += 1
            else:
                self.counters.update_failed += 1
        self._refresh()
        try:
            for event in outcome.events:
                await self._publish_event(client, event)
            await self._publish_report(client)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self._note_error(exc)  # the session is ending; the report follows on reconnect
        except Exception:  # a bug must not vanish in a task nobody awaits
            _log.warning("%s: update failed unexpectedly", self.device_id, exc_info=True)

    def _cancel_updates(self) -> None:
        """The session ended: downloads stop (the next session starts them again)."""
        for task in self._update_tasks:
            task.cancel()
        self._updates.clear()


def _cut(client: aiomqtt.Client) -> None:
    """Cut ``client``'s connection without DISCONNECT, so the broker publishes the will."""
    sock = client._client.socket()
    if not isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # paho reads EOF and reports the loss


def _envelope_payload(raw: bytes) -> bytes:
    """The payload of a DSSE envelope, unverified; :class:`WireError` if it is not one."""
    try:
        data = json.loads(raw)
        return base64.b64decode(data["payload"], validate=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise WireError(f"not a signed desired state: {exc!r}") from None
