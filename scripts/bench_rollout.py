#!/usr/bin/env python3
"""Benchmark a staged rollout: how fast one 100% stage reaches thousands of devices.

One run, on this machine:

1. start a real Mosquitto on a free port (``scripts/servers.py``'s ``MosquittoBroker``,
   authenticated by the files the controller writes) and ``edgefleet serve`` against it
   in its own process (SQLite in a temporary folder, or with ``--db postgresql`` a fresh
   database on the server named by ``EDGEFLEET_TEST_POSTGRES_URL``);
2. create the group ``bench`` and an enrollment token for it, register two versions of a
   small fake GGUF model (``bench-rollout`` 1.0 and 2.0) in the registry;
3. enroll ``--devices`` simulated devices (default 2,000) with an in-process
   :class:`fleet.simulate.Simulation` (one MQTT session each, on this process's asyncio
   loop; telemetry every ``--interval`` s, 30 by default, so telemetry does not dominate;
   an update takes ``--update-s``, 0 by default), and wait until every one has connected
   and reported;
4. BASELINE: put every device on 1.0 the way an admin does without a rollout
   (``PUT /api/v1/groups/bench/desired``), time it the same way, and wait until every
   device serves the registered 1.0, so the rollout has a previous version to restore;
5. ROLLOUT: ``POST /api/v1/rollouts`` of 2.0 to the group, one 100% stage, ``soak_s`` 0,
   no gates. Measured from the POST:

   - when each device RECEIVED its new signed desired state (the simulator side: the
     device's ``desired`` names 2.0's sha256), so the rate is devices ÷ the time until
     the last device had it; the goal is at least 200 devices/s, and AWS IoT Jobs'
     maximum rollout rate (1,000 devices a minute, 16.7/s) is printed beside it as a
     ratio, for scale;
   - when each device served 2.0 (the simulator), when the controller counted every
     device ``updated`` and when it called the rollout ``completed``
     (``GET /api/v1/rollouts/{id}``, polled every ``--poll-s``);
   - the CPU seconds of the controller, the broker, this process (the simulator) and,
     on PostgreSQL, the database server, and the controller's peak RSS, over the
     rollout and over its publishing part alone; the machine's other work ("other").

Results go to a table on stdout and to ``bench-results/rollout-<UTC timestamp>.json``;
progress to stderr. Not a timed test: see docs/benchmarks.md, "Rollout benchmark".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent

from benchlib import (  # noqa: E402 - scripts/ is on sys.path when a script runs
    cpu_seconds,
    fmt,
    machine_cpu,
    machine_description,
    make_log,
    percentile,
    render_table,
    tail,
    tree_cpu_seconds,
    tree_rss,
    version_of,
)
from servers import (  # noqa: E402
    MOSQUITTO,
    Controller,
    MosquittoBroker,
    postgres_database,
    running_controller,
)

log = make_log("bench-rollout")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fleet.simulate import (  # noqa: E402
    ModelRef,
    ServedModel,
    SimulatedDevice,
    Simulation,
    SimulationConfig,
)

MiB = 1024 * 1024
MODEL = "bench-rollout"
GROUP = "bench"
OLD, NEW = "1.0", "2.0"
GOAL_PER_S = 200.0  # desired states published per second, from the issue
AWS_IOT_JOBS_PER_S = 1000 / 60  # AWS IoT Jobs: at most 1,000 devices a minute per job
READY_S = 120.0  # for the controller: migrations on a busy 2-core machine
TRACK_EVERY_S = 0.02  # how often the simulator's devices are looked at
PROGRESS_EVERY_S = 2.0
PUT_ATTEMPTS = 5  # for the baseline's PUT, which a 503 asks to retry
BUSY_AT_START = 0.2  # cores busy before the run above which it warns


class SkippedError(RuntimeError):
    """The run cannot happen here (no PostgreSQL)."""


# --------------------------------------------------------------------------- the artifacts


def artifact(version: str) -> bytes:
    """A small file the registry takes as GGUF (16 KiB), different for each version."""
    return b"GGUF" + hashlib.sha256(f"{MODEL}@{version}".encode()).digest() * 512


# --------------------------------------------------------------------------- measurement


@dataclass
class CpuMark:
    at: float
    machine_busy: float  # seconds of all CPUs, not idle
    steal: float
    per_role: dict[str, float]


class Roles:
    """The processes whose CPU is counted apart: controller, broker, simulator, database."""

    def __init__(self, controller: int, broker: int, database: bool) -> None:
        self.controller = controller
        self.broker = broker
        self.database = database
        self.me = psutil.Process()

    def mark(self) -> CpuMark:
        busy, steal = machine_cpu()
        per_role = {
            "controller": tree_cpu_seconds([self.controller]),
            "broker": tree_cpu_seconds([self.broker]),
            # this process alone: its children are the controller and the broker
            "simulator": cpu_seconds(self.me),
        }
        if self.database:
            per_role["database"] = tree_cpu_seconds(postgres_pids())
        return CpuMark(time.monotonic(), busy, steal, per_role)


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes (its backends do the controller's writes)."""
    pids = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in {"postgres", "postmaster"}:
            pids.append(proc.pid)
    return pids


def cpu_between(before: CpuMark, after: CpuMark) -> dict[str, float]:
    """CPU seconds of each role between two marks, the machine's, steal, and everyone else's."""
    used = {role: after.per_role[role] - before.per_role.get(role, 0.0) for role in after.per_role}
    machine = after.machine_busy - before.machine_busy
    steal = after.steal - before.steal
    return {
        **used,
        "machine": machine,
        "steal": steal,
        "other": max(0.0, machine - steal - sum(used.values())),
        "seconds": after.at - before.at,
    }


class PeakRss(threading.Thread):
    """Samples the RSS of process trees every ``every_s`` in a thread; keeps each one's peak.

    A thread, so that a busy event loop (the simulator's) does not delay the samples.
    """

    def __init__(self, trees: dict[str, int], every_s: float = 0.2) -> None:
        super().__init__(daemon=True, name="peak-rss")
        self.trees = trees
        self.every_s = every_s
        self.peak: dict[str, int] = dict.fromkeys(trees, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every_s)

    def sample(self) -> None:
        for name, pid in self.trees.items():
            self.peak[name] = max(self.peak[name], tree_rss([pid]))

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join(5)
        self.sample()
        return dict(self.peak)


# --------------------------------------------------------------------------- the devices


def wants(device: SimulatedDevice, sha256: str) -> bool:
    """Whether the device holds a desired state naming the artifact ``sha256``."""
    desired = device.desired
    if desired is None:
        return False
    return any(
        m.name == MODEL and m.target is not None and m.target.sha256 == sha256
        for m in desired.models
    )


def serves(device: SimulatedDevice, sha256: str) -> bool:
    served = device.served.get(MODEL)
    return served is not None and served.sha256 == sha256


@dataclass
class Tracker:
    """When each simulated device received a desired state for ``sha256``, and served it.

    Polled every :data:`TRACK_EVERY_S` on the simulator's loop: a time is when the poll
    first saw it (at most that much late, or later when the loop is busy).
    """

    devices: list[SimulatedDevice]
    sha256: str
    t0: float  # perf_counter at the request
    received: list[float] = field(default_factory=list)  # seconds after t0
    served: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._to_receive = list(self.devices)
        self._to_serve = list(self.devices)

    def poll(self) -> None:
        now = time.perf_counter() - self.t0
        left = []
        for device in self._to_receive:
            if wants(device, self.sha256):
                self.received.append(now)
            else:
                left.append(device)
        self._to_receive = left
        left = []
        for device in self._to_serve:
            if serves(device, self.sha256):
                self.served.append(now)
            else:
                left.append(device)
        self._to_serve = left

    @property
    def all_received(self) -> bool:
        return not self._to_receive

    @property
    def all_served(self) -> bool:
        return not self._to_serve

    def summary(self) -> dict[str, Any]:
        n = len(self.devices)
        return {
            "devices": n,
            "received": len(self.received),
            "served": len(self.served),
            "received_s": times(self.received),
            "served_s": times(self.served),
            "received_per_s": (
                n / self.received[-1] if self.received and self.all_received else None
            ),
            "missing_received": [d.device_id for d in self._to_receive][:20],
            "missing_served": [d.device_id for d in self._to_serve][:20],
        }


def times(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "first": min(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "last": max(values) if values else None,
    }


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What the scenario works with."""

    args: argparse.Namespace
    controller: Controller
    api: httpx.AsyncClient
    roles: Roles
    doc: dict[str, Any]
    broker: MosquittoBroker

    def alive(self) -> None:
        """Stop waiting as soon as the controller or the broker has died."""
        if self.controller.proc.poll() is not None:
            raise RuntimeError(
                f"the controller exited ({self.controller.proc.returncode}):\n"
                f"{tail(self.controller.log, 30)}"
            )
        if self.broker.process is None or self.broker.process.poll() is not None:
            raise RuntimeError(f"Mosquitto exited:\n{self.broker.log()[-2000:]}")


async def check(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json() if response.content else None


async def register(api: httpx.AsyncClient, version: str) -> str:
    """Upload one version to the registry, as ``edgefleet models push`` does; its sha256."""
    data = artifact(version)
    response = await api.post(
        f"/api/v1/models/{MODEL}/versions/{version}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    body = await check(response, 201)
    sha = hashlib.sha256(data).hexdigest()
    if body["sha256"] != sha:
        raise RuntimeError(f"the registry holds {body['sha256']}, not {sha}")
    return sha


async def prepare(run: Run) -> tuple[str, str, str]:
    """The group, a token for it, versions 1.0 and 2.0 in the registry."""
    api, devices = run.api, run.args.devices
    await check(await api.post("/api/v1/groups", json={"name": GROUP}), 201)
    body = {"group": GROUP, "uses": devices, "expires_in_s": 86_400, "note": "bench-rollout"}
    token = (await check(await api.post("/api/v1/tokens", json=body), 201))["secret"]
    old, new = await register(api, OLD), await register(api, NEW)
    return token, old, new


async def enroll_and_connect(run: Run, sim: Simulation, task: asyncio.Task[Any]) -> None:
    """Enroll every device, connect them, wait until each has reported; progress as it goes."""
    args, doc = run.args, run.doc
    started = time.perf_counter()
    enrolled_s: float | None = None
    next_log = 0.0
    deadline = started + args.enroll_timeout
    while True:
        run.alive()
        if task.done():
            await task  # raises what ended it
            raise RuntimeError("the simulation ended before its devices ran")
        stats = sim.stats
        now = time.perf_counter()
        if enrolled_s is None and stats.stage == "devices":
            enrolled_s = now - started
            log(
                f"enrolled {stats.enrolled} devices in {enrolled_s:.1f} s "
                f"({stats.enrolled / enrolled_s:.1f}/s); connecting"
            )
        if stats.enroll_failed:
            raise RuntimeError(f"{stats.enroll_failed} enrollments failed: {stats.enroll_errors}")
        if stats.phase == "running":
            break
        if now >= next_log:
            if stats.stage == "enrolling":
                rate = stats.enrolled / max(now - started, 1e-6)
                log(f"  enrolling: {stats.enrolled}/{args.devices} ({rate:.1f}/s)")
            elif stats.stage == "devices":
                log(f"  connected: {stats.counters.connected}/{args.devices}")
            next_log = now + PROGRESS_EVERY_S
        if now > deadline:
            raise RuntimeError(f"devices not enrolled and connected within {args.enroll_timeout} s")
        await asyncio.sleep(0.1)
    counters = sim.stats.counters
    if counters.gave_up:
        raise RuntimeError(f"{counters.gave_up} devices gave up connecting: {counters.errors}")
    await asyncio.wait_for(sim.wait_ready(), args.enroll_timeout)
    connected_s = time.perf_counter() - started - (enrolled_s or 0.0)
    doc["enrollment"] = {
        "devices": sim.stats.enrolled,
        "seconds": enrolled_s,
        "per_s": sim.stats.enrolled / enrolled_s if enrolled_s else None,
        "connect_s": connected_s,
    }
    log(f"all {args.devices} connected and reported ({connected_s:.1f} s after enrolling)")


async def follow(
    run: Run,
    tracker: Tracker,
    what: str,
    deadline_s: float,
    until: Callable[[], bool] | None = None,
    progress: Callable[[], str] | None = None,
) -> None:
    """Poll the tracker until every device served (and ``until()`` says done), with progress."""
    next_log = 0.0
    while True:
        run.alive()
        tracker.poll()
        elapsed = time.perf_counter() - tracker.t0
        done = (until is None or until()) and tracker.all_served
        if elapsed >= next_log or done:
            extra = f"; {progress()}" if progress is not None else ""
            log(
                f"  {what} {elapsed:6.1f} s: received {len(tracker.received)}/"
                f"{len(tracker.devices)}, serving {len(tracker.served)}{extra}"
            )
            next_log = elapsed + PROGRESS_EVERY_S
        if done:
            return
        if elapsed > deadline_s:
            raise RuntimeError(f"{what}: not done within {deadline_s:g} s ({tracker.summary()})")
        await asyncio.sleep(TRACK_EVERY_S)


async def baseline(run: Run, sim: Simulation, sha: str) -> None:
    """Every device onto 1.0 through the group's desired state: the path without a rollout."""
    args, api = run.args, run.api
    log(f"baseline: PUT /api/v1/groups/{GROUP}/desired ({MODEL} {OLD}) to {args.devices} devices")
    mark = run.roles.mark()
    t0 = time.perf_counter()
    tracker = Tracker(list(sim.devices), sha, t0)
    wanted = {"models": [{"name": MODEL, "version": OLD}]}
    refused: list[str] = []  # 503 answers (the controller says: retry shortly)

    async def put_until_taken() -> httpx.Response:
        while True:
            response = await api.put(f"/api/v1/groups/{GROUP}/desired", json=wanted)
            if response.status_code != 503 or len(refused) >= PUT_ATTEMPTS - 1:
                return response
            refused.append(response.text[:300])
            log(f"  the PUT was answered 503 ({response.text[:120]}): trying again")
            await asyncio.sleep(1.0)

    put = asyncio.ensure_future(put_until_taken())

    def answered() -> bool:
        if put.done() and put.exception() is None and put.result().status_code != 202:
            raise RuntimeError(
                f"PUT group desired: HTTP {put.result().status_code}: {put.result().text[:500]}"
            )
        return put.done()

    await follow(run, tracker, "baseline", args.timeout, until=answered)
    response = await put
    put_s = response.elapsed.total_seconds()
    body = await check(response, 202)
    unpublished = sum(1 for d in body["devices"] if not d["published"])
    summary = tracker.summary()
    run.doc["baseline"] = {
        **summary,
        "request_s": put_s,
        "refused_503": refused,
        "unpublished": unpublished,
        "cpu_s": cpu_between(mark, run.roles.mark()),
    }
    log(
        f"baseline: every device received 1.0 within {fmt(summary['received_s']['last'])} s "
        f"({fmt(summary['received_per_s'], 0)}/s; the PUT answered in {put_s:.2f} s) and "
        "serves it"
    )


class RolloutWatch:
    """Polls ``GET /api/v1/rollouts/{id}`` and notes when counts and status first change."""

    def __init__(self, api: httpx.AsyncClient, rollout_id: str, devices: int, t0: float) -> None:
        self.api = api
        self.rollout_id = rollout_id
        self.devices = devices
        self.t0 = t0
        self.polls = 0
        self.latest: dict[str, Any] = {}
        self.at: dict[str, float] = {}  # event -> seconds after t0
        self.poll_s: list[float] = []  # how long each GET took

    def note(self, detail: dict[str, Any]) -> None:
        now = time.perf_counter() - self.t0
        self.latest = detail
        counts = detail.get("devices", {})
        if counts.get("pending", 0) == 0 and counts.get("queued", 0) == 0:
            self.at.setdefault("all_issued", now)
        if counts.get("updated", 0) >= self.devices:
            self.at.setdefault("all_updated", now)
        if detail.get("status") != "active":
            self.at.setdefault(str(detail.get("status")), now)

    async def run(self, every_s: float) -> None:
        while True:
            started = time.perf_counter()
            try:
                response = await self.api.get(f"/api/v1/rollouts/{self.rollout_id}")
                self.poll_s.append(time.perf_counter() - started)
                self.polls += 1
                if response.status_code == 200:
                    self.note(response.json())
            except httpx.HTTPError as exc:
                log(f"  GET rollout: {type(exc).__name__}: {exc}")
            await asyncio.sleep(every_s)

    def __call__(self) -> bool:
        status = self.latest.get("status")
        if status in {"aborted", "paused"}:
            raise RuntimeError(f"rollout {status}: {self.latest.get('reason')}")
        return status == "completed"

    def progress(self) -> str:
        counts = self.latest.get("devices", {})
        text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return f"controller: {self.latest.get('status', '?')} ({text or 'not read yet'})"


async def rollout(run: Run, sim: Simulation, sha: str) -> None:
    """The measured part: POST the rollout, follow it to completed."""
    args, api, doc = run.args, run.api, run.doc
    spec = {
        "name": "bench-rollout",
        "change": {"model": MODEL, "version": NEW},
        "target": {"groups": [GROUP]},
        "stages": {"percents": [100]},
        "soak_s": 0,
    }
    devices = list(sim.devices)
    received_before = sim.stats.counters.desired
    pids = {"controller": run.controller.proc.pid}
    idle_rss = tree_rss([run.controller.proc.pid])
    sampler = PeakRss(pids)
    sampler.start()
    mark0 = run.roles.mark()
    t0 = time.perf_counter()
    tracker = Tracker(devices, sha, t0)
    log(f"rollout: POST /api/v1/rollouts ({MODEL} {NEW}, one 100% stage, soak 0) at t=0")
    response = await api.post("/api/v1/rollouts", json=spec)
    post_s = time.perf_counter() - t0
    created = await check(response, 201)
    rollout_id = created["id"]
    log(f"  rollout {rollout_id} created; the POST answered in {post_s:.2f} s")
    watch = RolloutWatch(api, rollout_id, args.devices, t0)
    watch.note(created)
    poller = asyncio.create_task(watch.run(args.poll_s))
    mark_published: CpuMark | None = None
    rss_published: int | None = None
    try:
        # publishing: until every device holds its new desired state
        while not tracker.all_received:
            run.alive()
            tracker.poll()
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError(f"not every device received 2.0 within {args.timeout:g} s")
            if not tracker.all_received:
                await asyncio.sleep(TRACK_EVERY_S)
        mark_published = run.roles.mark()
        rss_published = max(sampler.peak["controller"], tree_rss([run.controller.proc.pid]))
        last = tracker.received[-1]
        log(
            f"  every device received its desired state {last:.2f} s after the POST: "
            f"{args.devices / last:.0f} devices/s"
        )
        await follow(run, tracker, "rollout", args.timeout, until=watch, progress=watch.progress)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    mark1 = run.roles.mark()
    peak = sampler.stop()
    summary = tracker.summary()
    published_s = summary["received_s"]["last"]
    doc["rollout"] = {
        "id": rollout_id,
        "spec": spec,
        **summary,
        "post_s": post_s,
        "desired_received_in_run": sim.stats.counters.desired - received_before,
        "controller_at_s": watch.at,
        "completed_s": watch.at.get("completed"),
        "final": {k: watch.latest.get(k) for k in ("status", "devices", "failures", "reason")},
        "audit": watch.latest.get("audit"),
        "get_polls": watch.polls,
        "get_s": times(watch.poll_s),
        "cpu_s": cpu_between(mark0, mark1),
        "cpu_s_publishing": cpu_between(mark0, mark_published) if mark_published else None,
        "controller_idle_rss_bytes": idle_rss,
        "controller_peak_rss_bytes": peak["controller"],
        "controller_peak_rss_publishing_bytes": rss_published,
        "rate_per_s": args.devices / published_s if published_s else None,
    }
    check_devices(devices, sha, doc["rollout"])


def check_devices(devices: list[SimulatedDevice], sha: str, result: dict[str, Any]) -> None:
    """Every device holds 2.0's desired state and serves 2.0; exactly one state each."""
    problems = []
    wrong = [d.device_id for d in devices if not (wants(d, sha) and serves(d, sha))]
    if wrong:
        problems.append(f"{len(wrong)} devices do not want and serve 2.0: {wrong[:5]}")
    if result["desired_received_in_run"] != len(devices):
        problems.append(
            f"the devices received {result['desired_received_in_run']} new desired states, "
            f"not one each ({len(devices)})"
        )
    final = result["final"]
    if final["status"] != "completed" or (final["devices"] or {}).get("updated") != len(devices):
        problems.append(f"the controller says {final}")
    result["problems"] = problems
    for problem in problems:
        log(f"  PROBLEM: {problem}")


async def scenario(
    args: argparse.Namespace,
    controller: Controller,
    run_doc: dict[str, Any],
    admin_token: str,
    roles: Roles,
    broker: MosquittoBroker,
) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "X-Edgefleet-Actor": "bench-rollout"}
    async with httpx.AsyncClient(
        base_url=controller.url, headers=headers, timeout=args.timeout, trust_env=False
    ) as api:
        run = Run(args, controller, api, roles, run_doc, broker)
        token, old, new = await prepare(run)
        run_doc["artifacts"] = {OLD: old, NEW: new, "size_bytes": len(artifact(OLD))}
        config = SimulationConfig(
            devices=args.devices,
            fleet_url=controller.url,
            token=token,
            interval_s=args.interval,
            models=(ServedModel.initial(ModelRef.parse(f"{MODEL}@{OLD}")),),
            update_s=args.update_s,
            update_jitter=0.5 if args.update_s > 0 else 0.0,
            seed=args.seed,
            stop_timeout_s=20.0,
        )
        sim = Simulation(config)
        log(f"enrolling {args.devices} simulated devices into group {GROUP!r}")
        task = asyncio.create_task(sim.run())
        try:
            await enroll_and_connect(run, sim, task)
            await baseline(run, sim, old)
            await asyncio.sleep(args.settle)  # the baseline's reports and events are stored
            await rollout(run, sim, new)
        finally:
            log("stopping the simulated devices")
            sim.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)
            run_doc["simulator"] = sim.stats.snapshot()


# --------------------------------------------------------------------------- report


def cores(cpu: dict[str, float] | None, role: str) -> str:
    if not cpu or role not in cpu:
        return "-"
    return f"{cpu[role]:.1f} s ({cpu[role] / max(cpu['seconds'], 1e-6):.0%})"


def report(doc: dict[str, Any]) -> str:
    config, ro, base = doc["config"], doc["rollout"], doc["baseline"]
    n = config["devices"]
    rate = ro.get("rate_per_s")
    base_rate = base.get("received_per_s")
    received, served = ro["received_s"], ro["served_s"]
    at = ro["controller_at_s"]
    spread = received["last"] - received["first"] if received["last"] is not None else None
    spread_rate = n / spread if spread else None
    cpu, cpu_pub = ro["cpu_s"], ro.get("cpu_s_publishing")
    enrollment = doc.get("enrollment", {})
    yes = {True: "met", False: "NOT met"}
    rows = [
        ["figure", "value"],
        ["POST /api/v1/rollouts answered", f"{ro['post_s']:.2f} s"],
        ["first device received its desired state", f"{fmt(received['first'])} s"],
        ["half the devices had it", f"{fmt(received['p50'])} s"],
        [f"all {n:,} had it (published)", f"{fmt(received['last'])} s"],
        ["DESIRED STATES PUBLISHED, devices/s", fmt(rate, 0)],
        [
            "  of which: POST to the first device (create, engine step)",
            f"{fmt(received['first'])} s",
        ],
        ["  first to last device, devices/s", fmt(spread_rate, 0)],
        ["  AWS IoT Jobs max rollout rate, devices/s", fmt(AWS_IOT_JOBS_PER_S, 1)],
        ["  ratio to it", f"{fmt(rate / AWS_IOT_JOBS_PER_S if rate else None, 1)}x"],
        [f"  goal >= {GOAL_PER_S:.0f} devices/s", yes[bool(rate and rate >= GOAL_PER_S)]],
        ["controller: every device issued (first GET to see it)", f"{fmt(at.get('all_issued'))} s"],
        [f"all {n:,} serve 2.0 (simulator)", f"{fmt(served['last'])} s"],
        [f"controller counts {n:,} updated", f"{fmt(at.get('all_updated'))} s"],
        ["rollout completed", f"{fmt(ro.get('completed_s'))} s"],
        ["controller CPU, POST to published", cores(cpu_pub, "controller")],
        ["controller CPU, POST to completed", cores(cpu, "controller")],
        [
            "controller RSS idle / peak",
            f"{ro['controller_idle_rss_bytes'] / MiB:.0f} / "
            f"{ro['controller_peak_rss_bytes'] / MiB:.0f} MiB",
        ],
        [
            "broker / simulator CPU, POST to completed",
            f"{cores(cpu, 'broker')} / {cores(cpu, 'simulator')}",
        ],
    ]
    if "database" in cpu:
        rows.append(["database server CPU, POST to completed", cores(cpu, "database")])
    rows += [
        ["other processes, POST to completed", cores(cpu, "other")],
        [
            "for comparison: group desired PUT, all had it",
            f"{fmt(base['received_s']['last'])} s "
            f"({fmt(base_rate, 0)} devices/s; the PUT answered in {base['request_s']:.2f} s)",
        ],
    ]
    if base.get("refused_503"):
        rows.append(
            [
                "  the group PUT was first answered 503",
                f"{len(base['refused_503'])} time(s): {base['refused_503'][0][:60]}",
            ]
        )
    out = [
        f"{n:,} simulated devices, {doc['database']}, telemetry every {config['interval_s']:g} s, "
        f"updates take {config['update_s']:g} s, engine interval "
        f"{config['rollout_interval_s'] or 'default'}; enrolled in "
        f"{fmt(enrollment.get('seconds'), 1)} s ({fmt(enrollment.get('per_s'), 1)}/s)",
        f"rollout {ro['id']}: {MODEL} {OLD} -> {NEW}, group {GROUP!r}, one 100% stage, soak 0, "
        "no gates; times from the POST",
        "",
        render_table(rows),
        "",
        f"receipt times (s after the POST): first {fmt(received['first'])}, p50 "
        f"{fmt(received['p50'])}, p90 {fmt(received['p90'])}, p99 {fmt(received['p99'])}, "
        f"last {fmt(received['last'])}",
        "CPU: seconds (share of one core over the span). Published = received by the simulated",
        f"device (polled every {TRACK_EVERY_S * 1000:.0f} ms); the controller's GET was polled "
        f"every {config['poll_s']:g} s.",
    ]
    noisy = {
        k: v
        for k, v in (doc.get("controller_log_counts") or {}).items()
        if v >= 2 or not k.startswith("WARNING")
    }
    if noisy:
        out.append("controller log: " + "; ".join(f"{v} x {k[:90]}" for k, v in noisy.items()))
    if ro.get("problems"):
        out.append("PROBLEMS: " + "; ".join(ro["problems"]))
    for warning in doc.get("warnings", []):
        out.append(f"WARNING: {warning}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{root / 'fleet.db'}"
        return
    admin = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL")
    if not admin:
        raise SkippedError(
            "no PostgreSQL: set EDGEFLEET_TEST_POSTGRES_URL (scripts/bench-rollout does)"
        )
    with postgres_database(admin) as url:
        yield url


def log_counts(path: Path) -> dict[str, int]:
    """The controller's warnings and errors, counted by message with the numbers taken out."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                message = level.strip() + " " + line.split(level, 1)[1]
                key = re.sub(r"\d+", "N", message)[:160]
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def raise_open_files_limit() -> None:
    """The simulator and Mosquitto each hold a socket per device; they inherit this limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )


def describe_machine() -> dict[str, Any]:
    return {
        **machine_description(),
        "mosquitto": version_of([MOSQUITTO, "-h"]),
        "postgres": version_of(["psql", "--version"]),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-rollout",
        description="Benchmark a 100%% rollout to simulated devices: desired states per second.",
    )
    parser.add_argument("--devices", type=int, default=2000, help="simulated devices (2000)")
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the controller's database (sqlite)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=30.0,
        help="seconds between a device's telemetry samples (30)",
    )
    parser.add_argument(
        "--update-s",
        type=float,
        default=0.0,
        help="seconds one simulated update takes, jittered ±50%% (0)",
    )
    parser.add_argument(
        "--rollout-interval",
        type=float,
        default=None,
        help="the engine's seconds between steps "
        "(EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S; the controller's default)",
    )
    parser.add_argument(
        "--poll-s", type=float, default=2.0, help="seconds between GETs of the rollout (2)"
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds between the baseline and the rollout (5)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds for the baseline and for the rollout, each (900)",
    )
    parser.add_argument(
        "--enroll-timeout",
        type=float,
        default=1800.0,
        help="seconds to enroll and connect every device (1800)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the simulator's seed (0)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (bench-results/rollout-<UTC>.json)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (controller log, database, broker)",
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.interval <= 0 or args.update_s < 0 or args.poll_s <= 0:
        parser.error("--devices, --interval and --poll-s must be positive, --update-s >= 0")
    return args


def interrupted(signum: int, _frame: Any) -> None:
    """SIGTERM as Ctrl-C: unwind, so the controller and the broker are stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args: argparse.Namespace, root: Path, doc: dict[str, Any]) -> None:
    broker = MosquittoBroker(root / "mosquitto")
    admin_token = secrets.token_urlsafe(24)
    env = {"EDGEFLEET_FLEET_ADMIN_TOKEN": admin_token}
    if args.rollout_interval is not None:
        env["EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S"] = str(args.rollout_interval)
    broker_args = [
        "--broker",
        broker.url,
        "--broker-auth-dir",
        str(broker.auth_dir),
        "--broker-pid-file",
        str(broker.pid_file),
    ]
    try:
        with database(args.db, root) as url:
            broker.start()
            assert broker.process is not None
            log(f"Mosquitto on port {broker.port}; starting the controller ({args.db})")
            started = time.monotonic()
            with running_controller(root, url, *broker_args, env=env, ready_s=READY_S) as served:
                doc["controller_ready_s"] = round(time.monotonic() - started, 2)
                command = served.proc.args
                doc["controller_command"] = (
                    " ".join(map(str, command)) if isinstance(command, list) else str(command)
                )
                roles = Roles(served.proc.pid, broker.process.pid, args.db == "postgresql")
                try:
                    asyncio.run(scenario(args, served, doc, admin_token, roles, broker))
                finally:
                    doc["controller_log_tail"] = tail(served.log, 60)
                    doc["controller_log_counts"] = log_counts(served.log)
    finally:
        broker.kill()
        doc["broker_log_tail"] = broker.log()[-4000:]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    raise_open_files_limit()
    started = dt.datetime.now(dt.UTC)
    machine = describe_machine()
    busy0, _ = machine_cpu()
    time.sleep(2.0)
    busy1, _ = machine_cpu()
    machine["busy_cores_at_start"] = round((busy1 - busy0) / 2.0, 2)
    warnings: list[str] = []
    if machine["busy_cores_at_start"] > BUSY_AT_START:
        warnings.append(
            f"the machine was already busy at the start ({machine['busy_cores_at_start']:.0%} "
            "of a core): expect noisy figures"
        )
        log(f"warning: {warnings[-1]}")
    doc: dict[str, Any] = {
        "benchmark": "rollout",
        "started_utc": started.isoformat(timespec="seconds"),
        "database": args.db,
        "config": {
            "devices": args.devices,
            "interval_s": args.interval,
            "update_s": args.update_s,
            "rollout_interval_s": args.rollout_interval,
            "poll_s": args.poll_s,
            "settle_s": args.settle,
            "seed": args.seed,
            "goal_per_s": GOAL_PER_S,
            "aws_iot_jobs_per_s": AWS_IOT_JOBS_PER_S,
        },
        "machine": machine,
        "warnings": warnings,
    }
    root = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        measure(args, root, doc)
    except SkippedError as exc:
        log(f"SKIPPED: {exc}")
        doc["error"] = f"skipped: {exc}"
    except KeyboardInterrupt:
        log("interrupted: stopped the controller and the broker")
        doc["error"] = "interrupted"
    except (
        RuntimeError,
        OSError,
        AssertionError,  # from servers.running_controller
        subprocess.SubprocessError,
        httpx.HTTPError,
    ) as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        doc["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    ro = doc.get("rollout") or {}
    other = (ro.get("cpu_s") or {}).get("other")
    if other is not None and other / max(ro["cpu_s"]["seconds"], 1e-6) > 0.25:
        warnings.append(
            f"other processes used {other / ro['cpu_s']['seconds']:.0%} of a core during the "
            "rollout: the machine was not idle, do not publish these figures"
        )
    doc["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = args.out or REPO / "bench-results" / f"rollout-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if "rollout" in doc and "baseline" in doc:
        print(report(doc))
    elif "error" in doc:
        print(f"no figures: {doc['error']}")
    print(f"\nJSON: {out}")
    failed = "error" in doc or bool(ro.get("problems"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
