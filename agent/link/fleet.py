"""The agent's side of the fleet link, as one async context manager the app's lifespan enters.

Entering never waits on the network: it reads the identity, opens the spool and
starts background tasks, then returns, so the agent serves locally whatever the
controller and broker are doing. The tasks:

- *enroll* (only before the first successful enrollment): retry with backoff while
  the controller is unreachable; stop (logged, shown in /v1/fleet) if it refuses;
- *telemetry*: every interval, take the request window and device gauges, and append
  a numbered sample to the spool (a FLUSH command takes one at once);
- *apply*: verify each desired state received (signed by the director key named in
  the trusted TUF root, for this device, newer than the last one accepted, unexpired:
  :func:`models.director.verify_desired`), then hand the newest to the host's
  executor at once, even while it still applies an older one (it pre-empts a download
  only the older state wanted: :mod:`agent.link.applier`); the executor installs signed
  model updates with the :class:`Updater` the link attaches; a transient update failure
  is retried with backoff;
- *session*: the MQTT connection (:mod:`agent.link.session`).

Leaving sends an OFFLINE event (best effort, bounded), disconnects and closes the
spool. Nothing here raises into serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import httpx

from agent.backoff import Backoff, Retry, seconds
from agent.boot_status import BootRecorder, Step
from agent.config import LinkSettings
from agent.errors import AgentError, ConfigError
from agent.hardware_id import read_hardware_id
from agent.link.applier import Applier
from agent.link.enroll import enroll
from agent.link.errors import EnrollmentRejected, IdentityError, LinkUnavailable
from agent.link.identity import Identity, StateDir
from agent.link.outcomes import ReconcileOutcome, outcome_events
from agent.link.session import Host, MqttSession, SessionStatus, load_broker_ca, new_event
from agent.link.spool import EntryKind, Spool
from agent.link.telemetry import Gauges, build_sample
from agent.link.update_source import FleetSource
from agent.metrics import WindowStats
from agent.state.report import agent_version
from agent.update.tuf_client import TufClient, TufError
from agent.update.updater import Emit, UpdateSource
from models.device import DeviceReport
from models.director import ReplayedState, SignatureRejected, TrustError, verify_desired
from models.paths import TUF_PATH
from models.wire import Command, CommandKind, DesiredState, EventKind, Severity, encode, utc_now

__all__ = ["FleetLink", "LinkHost", "TelemetryReader", "link_enabled", "prepare_identity"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0  # leaving waits this long for the OFFLINE event and disconnect
_INBOX_MAX = 16  # desired states kept while the previous one is being applied
_KEY_REFRESH_MIN_S = 60.0  # a bad signature refreshes TUF at most this often (seconds)
_UPDATE_RETRY_FIRST_S = 5.0  # first retry of an update that failed for a passing reason
_UPDATE_RETRY_MAX_S = 600.0  # and the longest wait between retries (seconds)


class LinkHost(Host, Protocol):
    """The executor side: the app's :class:`agent.state.apply.ModelController`."""

    async def apply_desired(self, desired: DesiredState) -> Sequence[ReconcileOutcome]: ...

    async def reconcile(self) -> Sequence[ReconcileOutcome]: ...

    def attach_updates(self, source: UpdateSource, emit: Emit) -> None:
        """Install signed targets from ``source`` from now on, reporting through ``emit``."""


class TelemetryReader(Protocol):
    """Where samples come from: :class:`agent.link.telemetry.TelemetrySource` in the app."""

    def read(self) -> tuple[WindowStats, Gauges]: ...


def link_enabled(settings: LinkSettings) -> bool:
    """The link runs when a controller URL is configured or the device is already enrolled."""
    return settings.url is not None or StateDir(settings.state_dir).identity_path.exists()


def _enrolled_as(identity: Identity) -> str:
    """The enrolled step's detail: ``device dev-... of https://fleet...``."""
    return f"device {identity.device_id} of {identity.fleet_url}"


async def prepare_identity(
    settings: LinkSettings,
    device: Callable[[], DeviceReport],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    boot: BootRecorder | None = None,
    hardware_id: Callable[[], str | None] = read_hardware_id,
) -> Identity | None:
    """At startup: the saved identity, or one enrollment attempt with the token.

    ``device`` probes the device, only when an enrollment needs the report. ``boot``
    records the provisioned, device key and enrolled steps (:mod:`agent.boot_status`).

    Raises :class:`ConfigError` (with what to do) when the device cannot be enrolled as
    configured or the controller refuses; returns None when the controller is
    unreachable (the link keeps trying in the background).
    """
    boot = boot or BootRecorder(None)
    state = StateDir(settings.state_dir)
    step = Step.ENROLLED  # the step a ConfigError stops
    try:
        identity = state.load_identity()
        if identity is not None:
            if settings.url is not None and settings.url != identity.fleet_url:
                raise IdentityError(
                    f"this device is enrolled with {identity.fleet_url} (as "
                    f"{identity.device_id}), not {settings.url}: to move it, remove "
                    f"{state.identity_path} and enroll with a token from the new controller"
                )
            if settings.token is not None:
                log.info("already enrolled as %s; the token is not used", identity.device_id)
            boot.finish(Step.PROVISIONED, f"enrolled earlier with {identity.fleet_url}")
            boot.finish(Step.DEVICE_KEY, str(state.key_path))
            boot.finish(Step.ENROLLED, _enrolled_as(identity))
            return identity
        if settings.url is None:
            return None
        step = Step.PROVISIONED
        if settings.token is None:
            raise ConfigError(
                f"this device is not enrolled with {settings.url} yet: pass --token TOKEN "
                "(an admin creates one with `edgefleet tokens create`)"
            )
        boot.finish(Step.PROVISIONED, f"fleet {settings.url}, with an enrollment token")
        step = Step.DEVICE_KEY
        await asyncio.to_thread(state.device_key)  # IdentityError says what is wrong with it
        boot.finish(Step.DEVICE_KEY, str(state.key_path))
        step = Step.ENROLLED
        boot.start(Step.ENROLLED, f"enrolling with {settings.url}")
        identity = await enroll(
            state,
            settings.url,
            settings.token.get_secret_value(),
            await asyncio.to_thread(device),
            agent_version=agent_version(),
            timeout_s=settings.enroll_timeout_s,
            transport=transport,
            hardware_id=await asyncio.to_thread(hardware_id),
        )
    except LinkUnavailable as exc:
        log.warning("%s; serving locally and retrying enrollment in the background", exc.message)
        boot.trouble(Step.ENROLLED, f"{exc.message}; retrying in the background", final=False)
        return None
    except ConfigError as exc:
        boot.trouble(step, exc.message, final=True)
        raise
    boot.finish(Step.ENROLLED, _enrolled_as(identity))
    return identity


class FleetLink:
    """Enrollment, telemetry, desired state and the MQTT session, in the background."""

    def __init__(
        self,
        settings: LinkSettings,
        host: LinkHost,
        telemetry: TelemetryReader,
        device: DeviceReport,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rand: Callable[[], float] = random.random,
        boot: BootRecorder | None = None,
        hardware_id: Callable[[], str | None] = read_hardware_id,
    ) -> None:
        self.settings = settings
        self.boot = boot or BootRecorder(None)  # first-boot progress (agent.boot_status)
        self._hardware_id = hardware_id
        self._broker_ca: str | None = None  # the provisioned broker CA (settings.broker_ca)
        self.host = host
        self.telemetry = telemetry
        self.device = device
        self.state_dir = StateDir(settings.state_dir)
        self._transport = transport
        self._rand = rand
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.identity: Identity | None = None
        self.spool: Spool | None = None
        self.session: MqttSession | None = None
        self.state = "starting"  # enrolling, running, rejected, disabled, stopped
        self.error: str | None = None
        self._lock_fd: int | None = None
        self._main: asyncio.Task[None] | None = None
        self._inbox: list[bytes] = []  # signed desired states received, not yet verified
        self._newest = host.desired_version  # highest desired version accepted
        self.tuf: TufClient | None = None
        self.source: FleetSource | None = None
        self._retry = Retry(Backoff(_UPDATE_RETRY_FIRST_S, _UPDATE_RETRY_MAX_S), rand)
        self._retry_timer: asyncio.TimerHandle | None = None
        self._last_key_refresh = -math.inf
        self._apply_due = asyncio.Event()
        self._reconcile_due = False
        self._flush = asyncio.Event()
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self._open)
        except (AgentError, OSError) as exc:
            message = exc.message if isinstance(exc, AgentError) else str(exc)
            self.state, self.error = "disabled", message
            log.error("fleet link disabled: %s; serving locally", message)
            step = Step.DESIRED_STATE if self.boot.is_done(Step.ENROLLED) else Step.ENROLLED
            self.boot.trouble(step, f"fleet link disabled: {message}", final=True)
            return self
        self._main = asyncio.create_task(self._run(), name="fleet-link")
        return self

    def _open(self) -> None:
        self.state_dir.ensure()
        fd = os.open(self.state_dir.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another agent uses the state folder {self.state_dir.root}: give each agent "
                "its own --state-dir"
            ) from None
        self._lock_fd = fd
        if self.settings.broker_ca is not None:
            self._broker_ca = load_broker_ca(self.settings.broker_ca)
        self.identity = self.state_dir.load_identity()
        self.spool = Spool(self.state_dir.spool_path, self.settings.spool_max_bytes)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._stopping.set()
        if self.session is not None:
            self.session.stop()
        if self._main is not None:
            await asyncio.wait({self._main}, timeout=_STOP_TIMEOUT_S)
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._main
        for task in list(self._background):
            task.cancel()
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.state != "disabled":
            self.state = "stopped"

    async def _run(self) -> None:
        identity = self.identity or await self._enroll()
        if identity is None:
            return
        self.identity = identity
        assert self.spool is not None
        self.session = MqttSession(
            identity,
            self.spool,
            self.host,
            on_desired=self._queue_desired,
            on_command=self._on_command,
            newest_desired=lambda: self._newest,
            backoff=self._backoff,
            auth_backoff_s=self.settings.auth_backoff_s,
            healthy_after_s=self.settings.healthy_after_s,
            publish_timeout_s=self.settings.publish_timeout_s,
            rand=self._rand,
            broker_ca=self._broker_ca,
            on_trouble=self._broker_trouble,
        )
        self.tuf = TufClient(
            self.state_dir.tuf_dir,
            identity.fleet_url.rstrip("/") + TUF_PATH + "/",
            auth=(identity.device_id, identity.broker.password),
            timeout_s=self.settings.enroll_timeout_s,
        )
        await asyncio.to_thread(self._bootstrap_trust, self.tuf)
        self.source = FleetSource(self.tuf, identity, timeout_s=self.settings.enroll_timeout_s)
        self.host.attach_updates(self.source, self.emit)
        self._reconcile_due = True  # resume an update a restart interrupted
        self._apply_due.set()
        self.state = "running"
        if not self.boot.is_done(Step.DESIRED_STATE):
            self.boot.start(
                Step.DESIRED_STATE, f"waiting for the desired state from {identity.broker.url}"
            )
        helpers = [
            asyncio.create_task(self._telemetry_loop(identity), name="fleet-telemetry"),
            asyncio.create_task(self._apply_loop(), name="fleet-apply"),
        ]
        try:
            await self.session.run()  # returns after stop()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._retry_timer is not None:
                self._retry_timer.cancel()
            await self.source.aclose()
            self.tuf.close()

    def _bootstrap_trust(self, tuf: TufClient) -> None:
        """Trust a first TUF root: the provisioned one, else the one enrollment sent.

        Once a root is trusted only properly signed new roots replace it (TUF's chain);
        without any, every desired state and update is refused (fail closed).
        """
        if tuf.has_root():
            return
        provisioned = self.settings.trust_root
        source = provisioned or self.state_dir.enrollment_root_path
        try:
            tuf.install_root(source.read_bytes())
        except FileNotFoundError:
            log.error(
                "no TUF trust root (%s is missing): desired states and updates are refused "
                "until one is provisioned with --trust-root",
                source,
            )
        except (OSError, TufError) as exc:
            log.error("the TUF trust root %s is refused: %s", source, exc)

    async def _enroll(self) -> Identity | None:
        settings = self.settings
        if settings.url is None or settings.token is None:
            self.state, self.error = "disabled", "not enrolled, and no fleet url and token given"
            log.error("fleet link disabled: %s", self.error)
            return None
        self.state = "enrolling"
        retry = Retry(self._backoff, self._rand)
        hardware_id = await asyncio.to_thread(self._hardware_id)
        while True:
            try:
                identity = await enroll(
                    self.state_dir,
                    settings.url,
                    settings.token.get_secret_value(),
                    self.device,
                    agent_version=agent_version(),
                    timeout_s=settings.enroll_timeout_s,
                    transport=self._transport,
                    hardware_id=hardware_id,
                )
            except EnrollmentRejected as exc:
                self.state, self.error = "rejected", exc.message
                log.error("%s; the agent keeps serving locally", exc.message)
                self.boot.trouble(Step.ENROLLED, exc.message, final=True)
                return None
            except (LinkUnavailable, IdentityError, OSError) as exc:
                self.error = exc.message if isinstance(exc, AgentError) else str(exc)
                delay = retry.next_delay()
                log.warning("enrollment failed (%s); retrying in %.1f s", self.error, delay)
                self.boot.trouble(
                    Step.ENROLLED, f"{self.error}; retrying in {seconds(delay)}", final=False
                )
            else:
                self.boot.finish(Step.ENROLLED, _enrolled_as(identity))
                return identity
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            if self._stopping.is_set():
                return None

    # -- desired state and commands ---------------------------------------------------

    def _queue_desired(self, payload: bytes) -> None:
        self._inbox.append(payload)
        del self._inbox[:-_INBOX_MAX]  # a flood keeps only the latest few
        self._apply_due.set()

    def _on_command(self, command: Command) -> None:
        if command.kind is CommandKind.REPORT:
            if self.session is not None:
                self.session.report_changed(force=True)
        elif command.kind is CommandKind.RECONCILE:
            self._reconcile_due = True
            self._apply_due.set()
        elif command.kind is CommandKind.FLUSH:
            self._flush.set()

    async def _apply_loop(self) -> None:
        """Verify what arrived and hand it to the host, never waiting for the host to finish.

        A newer desired state goes to the host at once, even mid-update, so that it can
        pre-empt a download only the older state wanted (:mod:`agent.link.applier`).
        """
        applier = Applier(self.host, self._reconciled, self._reconcile_failed)
        try:
            while True:
                await self._apply_due.wait()
                self._apply_due.clear()
                received, self._inbox = self._inbox, []
                reconcile, self._reconcile_due = self._reconcile_due, False
                try:
                    desired = await self._newest_verified(received)
                except Exception as exc:  # each refusal is reported; this is a bug
                    self._reconcile_failed(exc)
                    continue
                if desired is not None:
                    self._newest = desired.version
                    self.boot.finish(Step.DESIRED_STATE, f"version {desired.version}")
                    if self.session is not None:
                        self.session.status.received_desired_version = desired.version
                    applier.apply(desired)
                elif reconcile:
                    applier.reconcile()
        finally:
            await applier.aclose()

    def _reconciled(self, outcomes: Sequence[ReconcileOutcome]) -> None:
        self._schedule_retry(any(o.retry for o in outcomes))
        if self.session is not None:
            self.session.report_changed()

    def _reconcile_failed(self, exc: Exception) -> None:
        log.error("reconcile failed", exc_info=exc)
        self.emit(EventKind.RECONCILE_FAILED, f"reconcile failed: {exc!r}", severity=Severity.ERROR)

    def _schedule_retry(self, needed: bool) -> None:
        """Reconcile again after a backoff when an update failed for a passing reason."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if not needed:
            self._retry.reset()
            return
        delay = self._retry.next_delay()
        log.info("an update failed for a passing reason; trying again in %.0f s", delay)

        def due() -> None:
            self._reconcile_due = True
            self._apply_due.set()

        self._retry_timer = asyncio.get_running_loop().call_later(delay, due)

    async def _newest_verified(self, received: Sequence[bytes]) -> DesiredState | None:
        """The newest of ``received`` that passes every trust check; the rest are reported."""
        best: DesiredState | None = None
        for payload in received:
            try:
                desired = await asyncio.to_thread(self._verify, payload, self._newest)
            except ReplayedState as exc:
                if exc.again:  # the retained state, delivered again on a reconnect
                    log.debug("ignoring a desired state: %s", exc)
                else:
                    self._refused(exc)
            except (TrustError, TufError) as exc:
                self._refused(exc)
            else:
                if best is None or desired.version > best.version:
                    best = desired
        return best

    def _refused(self, exc: TrustError | TufError) -> None:
        log.error("refusing a desired state: %s", exc)
        self.boot.trouble(Step.DESIRED_STATE, f"desired state refused: {exc}", final=False)
        self.emit(
            EventKind.DESIRED_REJECTED,
            f"desired state refused: {exc}",
            severity=Severity.ERROR,
            data={"reason": type(exc).__name__, "detail": str(exc)[:500]},
        )

    def _verify(self, payload: bytes, last_version: int | None) -> DesiredState:
        """Blocking: verify with the trusted root's director keys.

        A signature that does not verify triggers one TUF refresh (rate-limited): the
        director key may have been rotated by a new root.
        """
        assert self.tuf is not None
        assert self.identity is not None
        device_id = self.identity.device_id

        def attempt() -> DesiredState:
            assert self.tuf is not None
            keys = self.tuf.director_keys()
            return verify_desired(
                payload, keys, device_id=device_id, last_version=last_version, now=utc_now()
            )

        try:
            return attempt()
        except SignatureRejected:
            now = time.monotonic()
            if now - self._last_key_refresh < _KEY_REFRESH_MIN_S:
                raise
            self._last_key_refresh = now
            try:
                self.tuf.refresh()
            except TufError as exc:
                log.warning("cannot refresh TUF metadata to look for new director keys: %s", exc)
                raise SignatureRejected(
                    "desired state not signed by a trusted director key"
                ) from exc
            return attempt()

    def _broker_trouble(self, message: str) -> None:
        """The session lost or could not reach the broker: the desired state waits for it."""
        self.boot.trouble(Step.DESIRED_STATE, message, final=False)

    def report_changed(self) -> None:
        """The host calls this when what it would report may have changed."""
        if self.session is not None:
            self.session.report_changed()

    # -- telemetry and events ---------------------------------------------------------

    @property
    def telemetry_interval_s(self) -> float | None:
        if self.settings.telemetry_interval_s is not None:
            return self.settings.telemetry_interval_s
        return self.identity.telemetry_interval_s if self.identity is not None else None

    async def _telemetry_loop(self, identity: Identity) -> None:
        interval = self.telemetry_interval_s or identity.telemetry_interval_s
        if interval > identity.heartbeat_interval_s:
            log.warning(
                "telemetry every %.0f s is rarer than the controller's heartbeat (%.0f s): "
                "it may show this device offline between samples",
                interval,
                identity.heartbeat_interval_s,
            )
        next_at = time.monotonic() + interval
        while True:
            wait = max(next_at - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush.wait(), timeout=wait)
            self._flush.clear()
            next_at = max(next_at + interval, time.monotonic() + interval / 2)
            try:
                await self.sample_now()
            except Exception:  # never let telemetry end the link
                log.exception("telemetry sample failed")

    async def sample_now(self) -> int | None:
        """Take one telemetry sample now and spool it; its seq, or None if dropped."""
        spool = self.spool
        if spool is None:
            return None
        stats, gauges = await asyncio.to_thread(self.telemetry.read)
        sample_id, ts = uuid.uuid4().hex, utc_now()

        def render(seq: int) -> bytes:
            return encode(build_sample(stats, gauges, sample_id=sample_id, seq=seq, ts=ts))

        seq = await asyncio.to_thread(spool.append_sample, sample_id, render)
        if self.session is not None:
            self.session.wake_sender()
        return seq

    def emit(
        self,
        kind: EventKind,
        message: str = "",
        *,
        severity: Severity = Severity.INFO,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Spool an event (in the background); dropped, with a debug log, before enrollment."""
        if self.identity is None or self.spool is None:
            log.debug("not enrolled: event %s not sent", kind.value)
            return
        event = new_event(self.identity.device_id, kind, message, severity=severity, data=data)
        spool = self.spool

        async def put() -> None:
            await asyncio.to_thread(spool.append, EntryKind.EVENT, event.id, encode(event))
            if self.session is not None:
                self.session.wake_sender()

        task = asyncio.create_task(put())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def model_outcomes(self, outcomes: Sequence[ReconcileOutcome]) -> None:
        """Send what a reconcile's results call for: one event per thing that happened.

        Updates are not repeated here (the updater sent their events);
        :func:`agent.link.outcomes.outcome_events` decides.
        """
        for event in outcome_events(outcomes):
            self.emit(event.kind, event.message, severity=event.severity, data=event.data)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What GET /v1/fleet shows."""
        identity = self.identity
        session: SessionStatus = (
            self.session.status if self.session is not None else SessionStatus(state=self.state)
        )
        spool = self.spool.stats() if self.spool is not None else None
        return {
            "enabled": True,
            "state": self.state if self.state != "running" else session.state,
            "enrolled": identity is not None,
            "device_id": identity.device_id if identity else None,
            "fleet_url": identity.fleet_url if identity else self.settings.url,
            "broker_url": identity.broker.url if identity else None,
            "connected": session.connected,
            "last_error": session.last_error or self.error,
            "last_connected_at": _iso(session.last_connected_at),
            "next_attempt_in_s": session.next_attempt_in_s,
            "last_desired_version": self._newest,
            "applied_desired_version": self.host.desired_version,
            "last_report_at": _iso(session.last_report_at),
            "telemetry_interval_s": self.telemetry_interval_s,
            "spool": None
            if spool is None
            else {
                "entries": spool.entries,
                "bytes": spool.bytes,
                "max_bytes": spool.max_bytes,
                "durable": spool.durable,
                "path": spool.path,
            },
            "dropped": None
            if spool is None
            else {"samples": spool.dropped.samples, "events": spool.dropped.events},
            "state_dir": str(self.state_dir.root),
            "trust_root": self.tuf is not None and self.tuf.has_root(),  # False: updates refused
        }


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
