"""A whole simulated fleet in one process: enroll (or reuse) identities, run the devices.

:class:`Simulation` is the I/O shell around the pure parts: it loads identities
from the state directory, enrolls the missing devices over HTTP with bounded
concurrency, starts one :class:`~fleet.simulate.device.SimulatedDevice` per index
on the running loop, keeps counters (and writes them to ``stats_file`` once a
second, for scripts such as ``scripts/bench_fleet.py``), and on :meth:`stop`
disconnects every device cleanly and saves each device's next sequence number.

In a test, use it as an async context manager: entering enrolls, connects every
device and returns once each has reported; leaving stops them::

    config = SimulationConfig(
        devices=20, fleet_url=url, token=token,
        hardware=HardwareMix.parse(["pi4-4g:3,orin-nano-8g"]),
        models=(ServedModel.initial(ModelRef.parse("gemma3-270m@1.0")),),
        regressions=RegressionRules.parse(["gemma3-270m@2.0:golden=fail"]),
        update_s=0.2,
    )
    async with Simulation(config) as sim:
        await sim.take_offline(0, 1)             # indices, device ids or devices
        ...                                      # start a rollout, watch it time out
        await sim.bring_online(0, 1)             # back; they reconcile and update
        sim.device(2).served["gemma3-270m"]      # what device 2 serves now

Errors, as the rest of the code base draws them::

    SimulationError
    ├── EnrollmentFailed     one device could not enroll
    │   (.transient: True for timeouts, 429 and 5xx, which were retried first)
    └── NoToken              devices need enrolling and no token was given
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from fleet.files import atomic_write
from fleet.simulate.device import DeviceCounters, DeviceTiming, OfflineMode, SimulatedDevice
from fleet.simulate.hardware import HardwareMix
from fleet.simulate.identity import (
    SimulatedIdentity,
    device_name,
    enrollment_request,
    load_identity,
    new_private_key,
    save_identity,
)
from fleet.simulate.regress import RegressionRules
from fleet.simulate.schedule import aligned_base, shard_indices, start_offset
from fleet.simulate.telemetry import DeviceProfile, device_report, profile_for
from fleet.simulate.update import ServedModel
from models.device import DeviceReport
from models.paths import ENROLL_PATH
from models.wire import EnrollmentResponse

__all__ = [
    "DEFAULT_AGENT_VERSION",
    "EnrollmentFailed",
    "NoToken",
    "Simulation",
    "SimulationConfig",
    "SimulationError",
    "SimulationStats",
    "device_profile",
    "enroll",
    "enrollment_report",
]

_log = logging.getLogger(__name__)

DEFAULT_AGENT_VERSION = "0.1.0-sim"


class SimulationError(Exception):
    """Root of the simulator's errors."""


class EnrollmentFailed(SimulationError):
    """The controller did not enroll a device; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class NoToken(SimulationError):
    """Some devices have no saved identity and no enrollment token was given."""


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; durations in seconds."""

    devices: int  # the whole simulated fleet (all shards together)
    fleet_url: str  # the controller's API, e.g. http://127.0.0.1:8000
    token: str | None = None  # enrollment token; only needed for devices not yet enrolled
    interval_s: float = 5.0  # seconds between one device's telemetry samples
    duration_s: float | None = None  # run this long once devices start; None: until stop();
    # 0: enroll (or load) the identities and return without connecting
    state_dir: Path | None = None  # identities kept here and reused by later runs
    broker_url: str | None = None  # overrides the broker URL the controller hands out
    shard: int = 0  # this process runs indices shard, shard + shards, ...
    shards: int = 1
    enroll_concurrency: int = 8  # enrollment requests in flight
    enroll_attempts: int = 5  # per device, for transient failures
    enroll_timeout_s: float = 30.0
    connect_concurrency: int = 100  # MQTT CONNECTs in flight
    keepalive_s: int = 60
    gpu_share: float = 0.3  # share of devices with a GPU (Jetson or desktop RTX)
    hardware: HardwareMix | None = None  # named profiles instead of the gpu_share mix
    models: tuple[ServedModel, ...] = ()  # what every device serves before a desired state
    regressions: RegressionRules = field(default_factory=RegressionRules)  # versions made worse
    update_s: float = 0.2  # seconds one update takes (download, install, health check)
    update_jitter: float = 0.5  # each takes update_s x (1 ± this); 0: exactly update_s
    seed: int = 0  # fixes profiles and telemetry draws per device index
    agent_version: str = DEFAULT_AGENT_VERSION
    stats_file: Path | None = None  # a JSON snapshot of the counters, rewritten every second
    stop_timeout_s: float = 30.0  # for the clean disconnect of every device

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if self.interval_s <= 0:
            raise ValueError("interval must be positive")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is not in 0..{self.shards - 1}")
        if self.update_s < 0 or not 0 <= self.update_jitter <= 1:
            raise ValueError("update_s must be at least 0 and update_jitter between 0 and 1")
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"a device serves one version of each model: {names}")

    @property
    def indices(self) -> range:
        return shard_indices(self.devices, self.shard, self.shards)


@dataclass
class SimulationStats:
    """Where a simulation stands; :meth:`snapshot` is what ``stats_file`` holds."""

    devices: int  # run by this process
    stage: str = "starting"  # starting, enrolling, devices, stopping, done
    reused: int = 0  # identities loaded from the state directory
    enrolled: int = 0  # enrolled by this run
    enroll_failed: int = 0
    enroll_pending: int = 0  # still to enroll
    enroll_errors: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)  # wall clock, seconds
    running_since: float | None = None  # when the devices started
    counters: DeviceCounters = field(default_factory=DeviceCounters)

    @property
    def phase(self) -> str:
        """The stage, with "devices" told apart as "connecting" and "running"."""
        if self.stage != "devices":
            return self.stage
        counters = self.counters
        settled = counters.connected + counters.gave_up >= self.devices - self.enroll_failed
        return "running" if settled else "connecting"

    @property
    def failed(self) -> int:
        """Devices not connected now: never enrolled, refused, or between reconnects."""
        return self.devices - self.counters.connected

    def snapshot(self) -> dict[str, Any]:
        counters = asdict(self.counters)
        counters["errors"] = dict(self.counters.errors)
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "devices": self.devices,
            "phase": self.phase,
            "reused": self.reused,
            "enrolled": self.enrolled,
            "enroll_failed": self.enroll_failed,
            "enroll_pending": self.enroll_pending,
            "enroll_errors": dict(self.enroll_errors),
            "started_at": self.started_at,
            "running_since": self.running_since,
            **counters,
        }


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        detail = body.get("error") or body.get("detail") or body
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
        return str(detail)[:300]
    return str(body)[:300]


async def enroll(
    http: httpx.AsyncClient,
    *,
    fleet_url: str,
    token: str,
    index: int,
    private_key: bytes,
    config: SimulationConfig,
) -> SimulatedIdentity:
    """Enroll device ``index`` with ``private_key``; retry transient failures with backoff."""
    name = device_name(index)
    report = enrollment_report(index, config)
    delay = 0.5
    for attempt in range(1, config.enroll_attempts + 1):
        request = enrollment_request(
            token=token,
            private_key=private_key,
            name=name,
            agent_version=config.agent_version,
            device=report,
            now=datetime.now(UTC),
        )
        try:
            response = await http.post(
                fleet_url + ENROLL_PATH,
                content=request.model_dump_json(),
                headers={"content-type": "application/json"},
            )
        except httpx.TransportError as exc:
            error = EnrollmentFailed(f"{type(exc).__name__}: {exc}", transient=True)
        else:
            if response.status_code in {200, 201}:
                enrolled = EnrollmentResponse.model_validate_json(response.content)
                return SimulatedIdentity(
                    index=index,
                    device_id=enrolled.device_id,
                    private_key=private_key,
                    broker=enrolled.broker,
                    fleet_url=fleet_url,
                )
            transient = response.status_code in {408, 429} or response.status_code >= 500
            error = EnrollmentFailed(
                f"HTTP {response.status_code}: {_error_text(response)}", transient=transient
            )
        if not error.transient or attempt == config.enroll_attempts:
            raise error
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def device_profile(index: int, config: SimulationConfig) -> DeviceProfile:
    """Device ``index``'s serving traits: from its hardware profile, else the default mix."""
    if config.hardware is not None:
        return config.hardware.pick(index).profile(index, seed=config.seed)
    return profile_for(index, gpu_share=config.gpu_share, seed=config.seed)


def enrollment_report(index: int, config: SimulationConfig) -> DeviceReport:
    """What device ``index`` reports about its hardware when it enrolls."""
    name = device_name(index)
    if config.hardware is not None:
        return config.hardware.pick(index).report(name, config.agent_version)
    return device_report(device_profile(index, config), name, config.agent_version)


DeviceRef = SimulatedDevice | int | str
"""A device of a simulation: itself, its index, or its device id."""


class Simulation:
    """Run ``config``'s share of a simulated fleet on the current event loop.

    Either :meth:`run` it (until :meth:`stop` or ``duration_s``) or use it as an async
    context manager (see the module docstring).
    """

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.fleet_url = config.fleet_url.rstrip("/")
        self.stats = SimulationStats(devices=len(config.indices))
        self.devices: list[SimulatedDevice] = []
        self._stop = asyncio.Event()
        self._started = asyncio.Event()  # self.devices is filled and running
        self._run: asyncio.Task[SimulationStats] | None = None

    def stop(self) -> None:
        """Disconnect every device and let :meth:`run` return (safe from a signal handler)."""
        self._stop.set()

    # --- in-process use ----------------------------------------------------------------------

    async def __aenter__(self) -> Simulation:
        """Enroll (or load), connect every device and wait until each has reported.

        Devices retry a broker they cannot reach without end, so a test bounds this (and
        :meth:`bring_online`) with its own deadline (``tests.polling.in_time``).
        """
        if self.config.duration_s is not None:
            raise ValueError("a simulation used with 'async with' runs until it is left")
        self._run = asyncio.create_task(self.run())
        started = asyncio.ensure_future(self._started.wait())
        try:
            await asyncio.wait([self._run, started], return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if self._run.done():
            await self._run  # raises what ended it (NoToken, ...)
            raise SimulationError("the simulation ended before its devices started")
        try:
            await self.wait_ready()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop every device (cleanly) and wait for :meth:`run` to return."""
        self.stop()
        if self._run is not None:
            await self._run

    def device(self, ref: DeviceRef) -> SimulatedDevice:
        """A running device by index or device id (:class:`KeyError` if not in this run)."""
        if isinstance(ref, SimulatedDevice):
            return ref
        for device in self.devices:
            if ref in (device.identity.index, device.identity.device_id):
                return device
        raise KeyError(f"no simulated device {ref!r} in this run")

    async def wait_ready(self, *refs: DeviceRef) -> None:
        """Wait until every device (or those named) is connected and has reported.

        :class:`SimulationError` when some cannot be (enrollment failed, credentials
        refused, the simulation stopped).
        """
        devices = [self.device(ref) for ref in refs] if refs else list(self.devices)
        ready = await asyncio.gather(*(device.wait_ready() for device in devices))
        missing = len(self.config.indices) - len(self.devices) if not refs else 0
        pairs = zip(devices, ready, strict=True)
        late = [device.identity.device_id for device, ok in pairs if not ok]
        if late or missing:
            raise SimulationError(
                f"{len(late) + missing} devices are not running: "
                f"{missing} could not enroll, {', '.join(late[:5]) or 'none'} stopped"
            )

    async def take_offline(
        self, *refs: DeviceRef, mode: OfflineMode | str = OfflineMode.DROP
    ) -> None:
        """Take devices off the broker (:class:`OfflineMode`) and wait until they are.

        They stay off until :meth:`bring_online`; with the default ``drop`` the broker
        publishes each one's last will, as on a power cut or a network loss.
        """
        devices = [self.device(ref) for ref in refs]
        for device in devices:
            device.go_offline(mode)
        await asyncio.gather(*(device.wait_down() for device in devices))

    async def bring_online(self, *refs: DeviceRef) -> None:
        """Bring devices back and wait until each has connected and reported again."""
        devices = [self.device(ref) for ref in refs]
        for device in devices:
            device.go_online()
        await self.wait_ready(*devices)

    async def run(self) -> SimulationStats:
        writer = asyncio.create_task(self._write_stats()) if self.config.stats_file else None
        try:
            identities = await self._identities()
            if not self._stop.is_set() and self.config.duration_s != 0:
                await self._run_devices(identities)
        finally:
            self.stats.stage = "done"
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                self._dump_stats()
        return self.stats

    # --- identities ------------------------------------------------------------------------

    async def _identities(self) -> list[SimulatedIdentity]:
        config = self.config
        found: list[SimulatedIdentity] = []
        missing: list[int] = []
        for index in config.indices:
            identity = (
                load_identity(config.state_dir, index, self.fleet_url)
                if config.state_dir is not None
                else None
            )
            if identity is None:
                missing.append(index)
            else:
                found.append(identity)
        self.stats.reused = len(found)
        if not missing:
            return found
        if not config.token:
            raise NoToken(
                f"{len(missing)} of {len(config.indices)} devices are not enrolled yet: "
                "pass --token (an enrollment token with enough uses)"
            )
        self.stats.stage = "enrolling"
        self.stats.enroll_pending = len(missing)
        found.extend(await self._enroll_all(missing, config.token))
        found.sort(key=lambda identity: identity.index)
        return found

    async def _enroll_all(self, indices: list[int], token: str) -> list[SimulatedIdentity]:
        config = self.config
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in indices:
            queue.put_nowait(index)
        enrolled: list[SimulatedIdentity] = []
        refused = False  # a permanent refusal (token used up, revoked) ends enrolling

        async def worker(http: httpx.AsyncClient) -> None:
            nonlocal refused
            while not refused and not self._stop.is_set():
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    identity = await enroll(
                        http,
                        fleet_url=self.fleet_url,
                        token=token,
                        index=index,
                        private_key=new_private_key(),
                        config=config,
                    )
                except EnrollmentFailed as exc:
                    self.stats.enroll_failed += 1
                    reason = str(exc)[:120]
                    self.stats.enroll_errors[reason] = self.stats.enroll_errors.get(reason, 0) + 1
                    if not exc.transient and not refused:
                        refused = True
                        _log.error("enrollment refused, not enrolling more devices: %s", exc)
                else:
                    if config.state_dir is not None:
                        save_identity(config.state_dir, identity)
                    enrolled.append(identity)
                    self.stats.enrolled += 1
                finally:
                    self.stats.enroll_pending -= 1

        limits = httpx.Limits(max_connections=config.enroll_concurrency)
        timeout = httpx.Timeout(config.enroll_timeout_s)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            workers = [
                asyncio.create_task(worker(http)) for _ in range(max(1, config.enroll_concurrency))
            ]
            await asyncio.gather(*workers)
        self.stats.enroll_failed += queue.qsize()  # skipped after a refusal or a stop
        self.stats.enroll_pending = 0
        return enrolled

    # --- devices ---------------------------------------------------------------------------

    async def _run_devices(self, identities: list[SimulatedIdentity]) -> None:
        config = self.config
        gate = asyncio.Semaphore(config.connect_concurrency)
        base = aligned_base(time.time(), config.interval_s)
        counters = self.stats.counters
        self.devices = [
            SimulatedDevice(
                identity,
                device_profile(identity.index, config),
                timing=DeviceTiming(
                    base=base,
                    offset=start_offset(identity.index, config.devices, config.interval_s),
                    interval=config.interval_s,
                    keepalive=config.keepalive_s,
                    update_s=config.update_s,
                    update_jitter=config.update_jitter,
                ),
                counters=counters,
                connect_gate=gate,
                agent_version=config.agent_version,
                broker_url=config.broker_url,
                seed=config.seed,
                models=config.models,
                rules=config.regressions,
            )
            for identity in identities
        ]
        self.stats.stage = "devices"
        self.stats.running_since = time.time()
        tasks = [asyncio.create_task(device.run()) for device in self.devices]
        self._started.set()
        try:
            if config.duration_s is None:
                await self._stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), config.duration_s)
        finally:
            self.stats.stage = "stopping"
            for device in self.devices:
                device.stop()
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=config.stop_timeout_s)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            self._save_sequences()

    def _save_sequences(self) -> None:
        state_dir = self.config.state_dir
        if state_dir is None:
            return
        for device in self.devices:
            if device.seq != device.identity.next_seq:
                try:
                    save_identity(state_dir, device.identity.with_seq(device.seq))
                except OSError as exc:
                    _log.warning("could not save %s: %s", device.identity.device_id, exc)

    # --- stats file ------------------------------------------------------------------------

    def _dump_stats(self) -> None:
        path = self.config.stats_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.stats.snapshot()).encode())

    async def _write_stats(self) -> None:
        while True:
            self._dump_stats()
            await asyncio.sleep(1.0)
