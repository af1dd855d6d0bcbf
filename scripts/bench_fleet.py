#!/usr/bin/env python3
"""Benchmark the fleet controller's telemetry ingest with simulated devices, in one run.

For each database (``sqlite``: a file in a temporary data folder; ``postgresql``: a
fresh database on the server named by ``EDGEFLEET_TEST_POSTGRES_URL``):

1. start a real Mosquitto on a free port, authenticated by the password and ACL files
   the controller writes (``scripts/servers.py``'s ``MosquittoBroker``); or, with
   ``--broker nats``, a 3-node NATS cluster behind haproxy (``scripts/bench_brokers.py``);
2. start ``edgefleet serve`` against it (its own process, a free HTTP port), measure its
   idle RSS, create an enrollment token and enroll every device once
   (``edgefleet simulate --duration 0``, identities kept in a state folder);
3. start the REFERENCE: a bare paho subscriber on the same broker, in its own process,
   subscribed to every device's telemetry with the controller's broker account. It
   only counts messages and measures publish -> receive lag (``sent_at`` to arrival):
   no validation, no database. It is what the broker and this machine allow;
4. for each step (``--devices 500,1000,2000``): run ``edgefleet simulate`` with that
   many devices (``--sim-processes`` processes), wait until all are connected, let
   ``--warmup`` seconds pass, then hold ``--hold`` seconds and measure: devices held
   connected (the simulator's count and the controller's ``/api/v1/status``), telemetry
   rows stored per second and the lag from ``sent_at`` to ``stored_at`` of those rows
   (from the database), the reference's rate and lag over the same window, RSS and CPU
   of the controller, the broker, the simulator, the reference and the database
   server, and the machine's total CPU. Then the simulator stops, ingest drains, and
   the samples published during the step are compared with those stored (missing).

A step "breaks" when the controller's p99 lag exceeds ``--lag-limit`` (2 s), when not
every device stayed connected, or when samples are missing. Results go to a table on
stdout and to ``bench-results/fleet-<UTC timestamp>.json``; progress to stderr. The
controller, the broker, the simulator and the reference share this machine's cores,
as they would share a small server. See docs/benchmarks.md, "Fleet benchmark".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent

from bench_brokers import BROKERS, BenchBroker, bench_broker, host_port  # noqa: E402
from benchlib import (  # noqa: E402 - scripts/ is on sys.path when a script runs
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
    haproxy,
    postgres_database,
    running_controller,
)

log = make_log("bench-fleet")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EDGEFLEET = Path(sys.executable).parent / "edgefleet"
TELEMETRY_FILTER = "edgefleet/v1/devices/+/telemetry"
CONTROLLER_USER = "edgefleet-controller"  # FleetSettings.broker_username's default
MiB = 1024 * 1024
READY_S = 120.0  # for the controller: migrations on a busy 2-core machine
DEFAULT_STEPS = "500,1000,2000,3000"


def lag_summary(lags: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50_s": percentile(lags, 50),
        "p95_s": percentile(lags, 95),
        "p99_s": percentile(lags, 99),
        "max_s": max(lags) if lags else None,
    }


# --------------------------------------------------------------------------- reference


def reference_subscriber(
    conn: multiprocessing.connection.Connection, host: str, port: int, password: str
) -> None:
    """A bare paho subscriber (child process): counts telemetry and measures its lag.

    Commands over ``conn``: ``("window", t0, t1)`` answers the count and lag
    percentiles of messages received in [t0, t1] (wall clock) and forgets older ones;
    ``("total",)`` the messages received since start; ``("stop",)`` ends it.
    """
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received: list[tuple[float, float]] = []  # (arrival, lag) in seconds
    lock = threading.Lock()
    total = 0
    subscribed = threading.Event()

    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if not reason.is_failure:
            client.subscribe(TELEMETRY_FILTER, qos=1)

    def on_subscribe(_c: Any, _u: Any, _mid: Any, _codes: Any, _p: Any = None) -> None:
        subscribed.set()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        nonlocal total
        now = time.time()
        try:
            sent = dt.datetime.fromisoformat(json.loads(message.payload)["sent_at"]).timestamp()
        except (ValueError, KeyError, TypeError):
            return
        with lock:
            received.append((now, now - sent))
            total += 1

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-reference-{os.getpid()}",
        clean_session=True,
    )
    client.username_pw_set(CONTROLLER_USER, password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=60)
    client.loop_start()
    conn.send(("ready", subscribed.wait(30)))
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        if command[0] == "total":
            conn.send(total)
        elif command[0] == "window":
            _, t0, t1 = command
            with lock:
                window = [lag for at, lag in received if t0 <= at <= t1]
                received[:] = [(at, lag) for at, lag in received if at > t1]
            conn.send({"count": len(window), **lag_summary(window)})
    client.disconnect()
    client.loop_stop()


class Reference:
    """The reference subscriber's process, asked over a pipe."""

    def __init__(self, host: str, port: int, password: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=reference_subscriber, args=(child, host, port, password), daemon=True
        )
        self.process.start()
        if not self.conn.poll(60):
            raise RuntimeError("the reference subscriber did not start")
        _, ok = self.conn.recv()
        if not ok:
            raise RuntimeError("the reference subscriber could not subscribe")

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def ask(self, *command: Any) -> Any:
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# --------------------------------------------------------------------------- processes


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes (its backends do the controller's writes)."""
    pids = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in {"postgres", "postmaster"}:
            pids.append(proc.pid)
    return pids


@dataclass
class CpuMark:
    at: float
    machine_busy: float  # seconds of all CPUs, not idle
    steal: float
    per_role: dict[str, float]


def cpu_mark(roles: dict[str, list[int]]) -> CpuMark:
    busy, steal = machine_cpu()
    return CpuMark(
        time.monotonic(), busy, steal, {r: tree_cpu_seconds(p) for r, p in roles.items()}
    )


def cpu_usage(before: CpuMark, after: CpuMark) -> dict[str, float]:
    """Each role's CPU in cores (1.0 = one core busy), the machine's, and everything else."""
    elapsed = max(after.at - before.at, 1e-6)
    usage = {
        role: (after.per_role[role] - before.per_role.get(role, 0.0)) / elapsed
        for role in after.per_role
    }
    usage["machine"] = (after.machine_busy - before.machine_busy) / elapsed
    usage["steal"] = (after.steal - before.steal) / elapsed
    usage["other"] = max(
        0.0,
        usage["machine"] - usage["steal"] - sum(v for k, v in usage.items() if k in after.per_role),
    )
    return usage


@dataclass
class Controller:
    """The controller under test (``replicas`` processes on one database) and its admin API.

    With more than one replica they share ingest (one MQTT 5 shared subscription group,
    a client id each) and the admin API and the devices reach them through haproxy.
    """

    processes: list[subprocess.Popen[bytes]]
    url: str
    log_paths: list[Path]
    broker_password: str
    http: httpx.Client
    ready_s: float  # from start to every replica's /readyz answering

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def create_token(self, uses: int, group: str | None = None) -> str:
        body = {"uses": uses, "expires_in_s": 86_400, "note": "bench-fleet", "group": group}
        response = self.http.post("/api/v1/tokens", json=body)
        response.raise_for_status()
        return str(response.json()["secret"])

    def online(self) -> int | None:
        try:
            response = self.http.get("/api/v1/status", timeout=10)
            return int(response.json()["devices"]["online"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None


@contextlib.contextmanager
def controlled(
    root: Path, database_url: str, broker: BenchBroker, broker_password: str, replicas: int = 1
) -> Iterator[Controller]:
    """``edgefleet serve`` against the broker, with an admin token and a broker password."""
    admin_token = secrets.token_urlsafe(24)
    started = time.monotonic()
    with contextlib.ExitStack() as running:
        served = []
        for k in range(replicas):
            env = {
                "EDGEFLEET_FLEET_ADMIN_TOKEN": admin_token,
                "EDGEFLEET_FLEET_BROKER_PASSWORD": broker_password,
                **broker.replica_env(k, replicas),
            }
            served.append(
                running.enter_context(
                    running_controller(
                        root,
                        database_url,
                        *broker.controller_args(),
                        env=env,
                        ready_s=READY_S,
                        name=f"controller-r{k}",
                        data_dir=root / "data",  # the shared artifact store
                    )
                )
            )
        url = served[0].url
        if replicas > 1:
            backends = [r.url.removeprefix("http://") for r in served]
            url = running.enter_context(haproxy(root / "haproxy", backends))
        http = running.enter_context(
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
            )
        )
        yield Controller(
            [r.proc for r in served],
            url,
            [r.log for r in served],
            broker_password,
            http,
            time.monotonic() - started,
        )


class Simulator:
    """``edgefleet simulate`` in ``processes`` processes (``--shard i/K``), stats via files."""

    def __init__(
        self,
        root: Path,
        *,
        devices: int,
        fleet_url: str,
        state_dir: Path,
        interval: float,
        processes: int,
        token: str | None = None,
        duration: float | None = None,
        name: str = "sim",
    ) -> None:
        self.stats_files = [root / f"{name}-stats-{k}.json" for k in range(processes)]
        self.logs = [root / f"{name}-{k}.log" for k in range(processes)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for k in range(processes):
            self.stats_files[k].unlink(missing_ok=True)
            command = [
                str(EDGEFLEET),
                "simulate",
                "--devices",
                str(devices),
                "--fleet-url",
                fleet_url,
                "--interval",
                str(interval),
                "--state-dir",
                str(state_dir),
                "--shard",
                f"{k}/{processes}",
                "--stats-file",
                str(self.stats_files[k]),
                "--quiet",
            ]
            if token:
                command += ["--token", token]
            if duration is not None:
                command += ["--duration", str(duration)]
            with self.logs[k].open("wb") as out:
                self.processes.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root)
                )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stats(self) -> list[dict[str, Any]]:
        found = []
        for path in self.stats_files:
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(path.read_text()))
        return found

    def total(self, key: str) -> int:
        return sum(int(s.get(key) or 0) for s in self.stats())

    def phases(self) -> list[str]:
        stats = self.stats()
        return [s.get("phase", "?") for s in stats] + ["starting"] * (
            len(self.stats_files) - len(stats)
        )

    def failed(self) -> str | None:
        for k, proc in enumerate(self.processes):
            code = proc.poll()
            if code not in (None, 0):
                return f"simulator {k} exited with {code}:\n{tail(self.logs[k])}"
        return None

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, timeout: float = 60.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        self.wait(timeout)


# --------------------------------------------------------------------------- database


class TelemetryQueries:
    """Reads the controller's telemetry table (rows are only counted and timed)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from fleet.tables import TelemetryRow

        self.sa = sa
        self.table = TelemetryRow.__table__  # type: ignore[attr-defined]
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=connect_args)

    def max_id(self) -> int:
        sa = self.sa
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(self.table.c.id))).scalar() or 0)

    def count_after(self, first_id: int) -> int:
        sa = self.sa
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(self.table.c.id > first_id)
            return int(conn.execute(query).scalar() or 0)

    def lags(self, after_id: int, up_to_id: int) -> list[float]:
        """``stored_at - sent_at`` in seconds for rows with ids in (after_id, up_to_id]."""
        from fleet.tables import as_utc

        sa = self.sa
        t = self.table
        query = sa.select(t.c.sent_at, t.c.stored_at).where(t.c.id > after_id, t.c.id <= up_to_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        lags = []
        for sent, stored in rows:
            sent_utc, stored_utc = as_utc(sent), as_utc(stored)
            assert sent_utc is not None
            assert stored_utc is not None
            lags.append((stored_utc - sent_utc).total_seconds())
        return lags

    def bytes_per_row(self) -> float | None:
        """PostgreSQL's bytes per stored sample, indexes and TOAST included."""
        sa = self.sa
        name = self.table.name
        query = sa.text(f"SELECT pg_total_relation_size('{name}'), count(*) FROM {name}")
        with self.engine.connect() as conn:
            size, rows = conn.execute(query).one()
        return float(size) / rows if rows else None

    def dispose(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{root / 'fleet.db'}"
        return
    admin = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL")
    if not admin:
        raise SkippedError(
            "no PostgreSQL: set EDGEFLEET_TEST_POSTGRES_URL (scripts/bench-fleet does)"
        )
    with postgres_database(admin) as url:
        yield url


class SkippedError(RuntimeError):
    pass


# --------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    devices: int
    data: dict[str, Any] = field(default_factory=dict)


def wait_connected(sim: Simulator, devices: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        problem = sim.failed()
        if problem:
            raise RuntimeError(problem)
        phases = sim.phases()
        if all(p == "running" for p in phases):
            return time.monotonic() - started
        time.sleep(0.5)  # polling another process's stats file
    log(f"  not every device connected after {timeout:.0f} s ({sim.total('connected')}/{devices})")
    return time.monotonic() - started


def drain(
    queries: TelemetryQueries, first_id: int, quiet_for: float = 3.0, limit: float = 60.0
) -> int:
    """Wait until no new telemetry rows arrive for ``quiet_for`` seconds; rows stored since."""
    deadline = time.monotonic() + limit
    count = queries.count_after(first_id)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)  # polling the database another process writes
        now = queries.count_after(first_id)
        if now != count:
            count, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet_for:
            break
    return count


def run_step(
    args: argparse.Namespace,
    root: Path,
    devices: int,
    controller: Controller,
    broker: BenchBroker,
    reference: Reference,
    queries: TelemetryQueries,
    state_dir: Path,
    db_pids: list[int],
) -> dict[str, Any]:
    step_first_id = queries.max_id()
    ref_total_before = reference.ask("total")
    log(f"  {devices} devices: starting the simulator ({args.sim_processes} process(es))")
    sim = Simulator(
        root,
        devices=devices,
        fleet_url=controller.url,
        state_dir=state_dir,
        interval=args.interval,
        processes=args.sim_processes,
        name=f"sim-{devices}",
    )
    result: dict[str, Any] = {"devices": devices, "expected_samples_per_s": devices / args.interval}
    try:
        result["connect_s"] = round(wait_connected(sim, devices, args.connect_timeout), 2)
        log(f"  connected in {result['connect_s']:.1f} s; warming up {args.warmup:.0f} s")
        time.sleep(args.warmup)
        roles = {
            "controller": controller.pids,
            "broker": broker.pids(),
            "simulator": sim.pids,
            "reference": [reference.pid],
        }
        if db_pids:
            roles["database"] = db_pids
        t0 = time.time()
        first_id = queries.max_id()
        published0 = sim.total("published")
        cpu0 = cpu_mark(roles)
        log(f"  holding {args.hold:.0f} s")
        connected_min = sim.total("connected")
        online_min: int | None = None
        rss_max = {"controller": 0, "broker": 0, "simulator": 0}
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            connected_min = min(connected_min, sim.total("connected"))
            online = controller.online()
            if online is not None:
                online_min = online if online_min is None else min(online_min, online)
            for role in rss_max:
                rss_max[role] = max(rss_max[role], tree_rss(roles[role]))
            problem = sim.failed()
            if problem:
                raise RuntimeError(problem)
        cpu1 = cpu_mark(roles)
        t1 = time.time()
        last_id = queries.max_id()
        published1 = sim.total("published")
        ref = reference.ask("window", t0, t1)
        window = t1 - t0
        lags = queries.lags(first_id, last_id)
        stored = len(lags)
        controller_rss = tree_rss(controller.pids)
        result.update(
            {
                "window_s": round(window, 2),
                "connected_min": connected_min,
                "controller_online_min": online_min,
                "published_per_s": (published1 - published0) / window,
                "stored_per_s": stored / window,
                "lag": lag_summary(lags),
                "reference": {
                    "received_per_s": ref["count"] / window,
                    "lag": {k: v for k, v in ref.items() if k != "count"},
                },
                "cpu_cores": cpu_usage(cpu0, cpu1),
                "rss_bytes": {
                    "controller": controller_rss,
                    "controller_max": rss_max["controller"],
                    "broker": rss_max["broker"],
                    "simulator": rss_max["simulator"],
                },
            }
        )
    finally:
        log("  stopping the simulator")
        sim.stop()
    # What the simulator says it published (PUBACKed), against what the controller stored.
    published_total = sim.total("published")  # acknowledged: the broker has them
    sent_total = sim.total("sent")  # also those still unacknowledged when the simulator stopped
    stored_total = drain(queries, step_first_id)
    ref_total = reference.ask("total") - ref_total_before
    result["published_total"] = published_total
    result["sent_total"] = sent_total
    result["stored_total"] = stored_total
    result["missing"] = max(0, published_total - stored_total)
    result.setdefault("reference", {})["received_total"] = ref_total
    result["reference"]["missing"] = max(0, published_total - ref_total)
    result["simulator_errors"] = {
        key: value for stats in sim.stats() for key, value in (stats.get("errors") or {}).items()
    }
    return result


def judge(step: dict[str, Any], lag_limit: float) -> list[str]:
    """Why a step counts as broken (empty: it held)."""
    reasons = []
    p99 = step.get("lag", {}).get("p99_s")
    if p99 is None:
        reasons.append("no telemetry stored")
    elif p99 > lag_limit:
        reasons.append(f"p99 lag {p99:.2f} s > {lag_limit:g} s")
    if step.get("connected_min", 0) < step["devices"]:
        reasons.append(f"{step['devices'] - step.get('connected_min', 0)} devices not connected")
    online = step.get("controller_online_min")
    if online is not None and online < step["devices"]:
        reasons.append(f"controller saw only {online} online")
    if step.get("missing"):
        reasons.append(f"{step['missing']} samples missing")
    return reasons


# --------------------------------------------------------------------------- fan-out

FANOUT_MODEL = "bench-fanout"
FANOUT_BYTES = b"GGUF" + bytes(range(256)) * 16  # starts like a GGUF file: the registry checks


def serving(queries: TelemetryQueries, version: str) -> tuple[int, dt.datetime | None]:
    """Devices that report ``FANOUT_MODEL`` ``version`` ready, and the last such report."""
    from fleet.tables import Device, as_utc

    sa = queries.sa
    table = Device.__table__  # type: ignore[attr-defined]
    with queries.engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.reported, table.c.reported_at)).all()
    count, last = 0, None
    for reported, at in rows:
        models = (json.loads(reported) if isinstance(reported, str) else reported or {}).get(
            "models", []
        )
        if any(
            (m.get("name"), m.get("version"), m.get("state")) == (FANOUT_MODEL, version, "ready")
            for m in models
        ):
            count += 1
            at_utc = as_utc(at)
            last = at_utc if last is None or (at_utc and at_utc > last) else last
    return count, last


def run_fanout(
    args: argparse.Namespace,
    root: Path,
    devices: int,
    controller: Controller,
    queries: TelemetryQueries,
    state_dir: Path,
    roles: dict[str, list[int]],
) -> dict[str, Any]:
    """Every device connected; one desired state for the group; until every device serves it.

    Timed from the ``PUT`` to the last device's report that it serves the new model (the
    controller's ``reported_at``), so it covers signing and publishing the desired states,
    the broker's delivery, each device's download through the controller and its report.
    """
    for version in ("1.0",):
        controller.http.post(
            f"/api/v1/models/{FANOUT_MODEL}/versions/{version}",
            content=FANOUT_BYTES,
            headers={"Content-Type": "application/octet-stream"},
        ).raise_for_status()
    sim = Simulator(
        root,
        devices=devices,
        fleet_url=controller.url,
        state_dir=state_dir,
        interval=args.interval,
        processes=args.sim_processes,
        name=f"fanout-{devices}",
    )
    try:
        wait_connected(sim, devices, args.connect_timeout)
        time.sleep(args.warmup)
        roles = {**roles, "simulator": sim.pids}
        cpu0 = cpu_mark(roles)
        put_at = dt.datetime.now(dt.UTC)
        started = time.monotonic()
        controller.http.put(
            "/api/v1/groups/bench/desired",
            json={"models": [{"name": FANOUT_MODEL, "version": "1.0"}]},
        ).raise_for_status()
        put_s = time.monotonic() - started
        count, last = 0, None
        while time.monotonic() - started < args.connect_timeout:
            count, last = serving(queries, "1.0")
            if count >= devices:
                break
            time.sleep(0.5)  # polling the database another process writes
        cpu = cpu_usage(cpu0, cpu_mark(roles))
    finally:
        sim.stop()
    seconds = (last - put_at).total_seconds() if last is not None else None
    return {
        "devices": devices,
        "serving": count,
        "put_s": round(put_s, 3),
        "seconds": seconds,
        "devices_per_s": devices / seconds if seconds and count >= devices else None,
        "cpu_cores": cpu,
    }


# --------------------------------------------------------------------------- one database


def run_database(
    args: argparse.Namespace, kind: str, steps: list[int], replicas: int = 1
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{kind}-"))
    result: dict[str, Any] = {
        "database": kind,
        "replicas": replicas,
        "broker": args.broker,
        "steps": [],
    }
    broker: BenchBroker | None = None
    controller: Controller | None = None
    reference: Reference | None = None
    queries: TelemetryQueries | None = None
    broker_password = secrets.token_urlsafe(24)
    try:
        with database(kind, root) as url, contextlib.ExitStack() as running:
            broker = running.enter_context(
                bench_broker(args.broker, root, broker_password, args.nats_consumer_replicas)
            )
            log(f"{kind}: {broker.name} at {broker.url}; starting the controller")
            controller = running.enter_context(
                controlled(root, url, broker, broker_password, replicas)
            )
            result["controller_ready_s"] = round(controller.ready_s, 2)
            result["controller_command"] = " ".join(controller.processes[0].args)
            time.sleep(3.0)
            result["controller_idle_rss_bytes"] = idle_rss = tree_rss(controller.pids)
            result["broker_idle_rss_bytes"] = tree_rss(broker.pids())
            log(f"{kind}: controller idle RSS {idle_rss / MiB:.0f} MiB")
            state_dir = root / "identities"
            controller.http.post("/api/v1/groups", json={"name": "bench"}).raise_for_status()
            token = controller.create_token(max(steps), group="bench")
            log(f"{kind}: enrolling {max(steps)} devices")
            started = time.monotonic()
            enroll = Simulator(
                root,
                devices=max(steps),
                fleet_url=controller.url,
                state_dir=state_dir,
                interval=args.interval,
                processes=1,
                token=token,
                duration=0,
                name="enroll",
            )
            enroll.wait(args.enroll_timeout)
            enrolled_s = time.monotonic() - started
            enrolled = enroll.total("enrolled") + enroll.total("reused")
            result["enrollment"] = {
                "devices": enrolled,
                "seconds": round(enrolled_s, 2),
                "per_s": enrolled / enrolled_s if enrolled_s else None,
                "failed": enroll.total("enroll_failed"),
            }
            log(f"{kind}: enrolled {enrolled} in {enrolled_s:.1f} s")
            if enrolled < max(steps):
                raise RuntimeError(
                    f"only {enrolled} of {max(steps)} enrolled:\n{tail(enroll.logs[0])}"
                )
            queries = TelemetryQueries(url)
            reference = Reference(*host_port(broker.url), controller.broker_password)
            db_pids = postgres_pids() if kind == "postgresql" else []
            for devices in steps:
                step = run_step(
                    args, root, devices, controller, broker, reference, queries, state_dir, db_pids
                )
                step["rss_per_device_bytes"] = (
                    step["rss_bytes"]["controller"] - idle_rss
                ) / devices
                step["broken"] = judge(step, args.lag_limit)
                result["steps"].append(step)
                log(f"  {summary_line(step)}")
                if step["broken"] and not args.keep_going:
                    log(f"{kind}: stopping at {devices} devices: {'; '.join(step['broken'])}")
                    break
            if kind == "postgresql":
                result["telemetry_bytes_per_row"] = queries.bytes_per_row()
            first_broken = next((s for s in result["steps"] if s["broken"]), None)
            result["breaks_at"] = first_broken["devices"] if first_broken else None
            if args.fanout:
                held = [s["devices"] for s in result["steps"] if not s["broken"]]
                fanout_devices = max(held or [min(steps)])
                log(f"{kind}: fan-out of one desired state to {fanout_devices} devices")
                roles = {
                    "controller": controller.pids,
                    "database": db_pids,
                    "broker": broker.pids(),
                }
                result["fanout"] = run_fanout(
                    args, root, fanout_devices, controller, queries, state_dir, roles
                )
                log(f"  {fanout_line(result['fanout'])}")
            result["status"] = "ok"
    except SkippedError as exc:
        log(f"{kind}: SKIPPED: {exc}")
        result.update(status="skipped", reason=str(exc))
    except (
        RuntimeError,
        OSError,
        AssertionError,  # from servers.running_controller
        subprocess.SubprocessError,
        httpx.HTTPError,
    ) as exc:
        log(f"{kind}: FAILED: {type(exc).__name__}: {exc}")
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        if reference is not None:
            reference.stop()
        if queries is not None:
            queries.dispose()
        if controller is not None:  # stopped by now
            result["controller_log_tail"] = tail(controller.log_paths[0])
        if broker is not None:  # stopped by now, its logs kept
            result["broker_log_tail"] = broker.log()[-4000:]
        if args.keep:
            log(f"{kind}: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summary_line(step: dict[str, Any]) -> str:
    lag = step.get("lag", {})
    ref = step.get("reference", {})
    state = "ok" if not step.get("broken") else "BROKEN: " + "; ".join(step["broken"])
    return (
        f"{step['devices']} devices: {fmt(step.get('stored_per_s'), 1)} samples/s stored "
        f"(reference {fmt(ref.get('received_per_s'), 1)}), p99 lag {fmt(lag.get('p99_s'), 3)} s "
        f"(reference {fmt(ref.get('lag', {}).get('p99_s'), 3)} s), missing {step.get('missing')}: "
        f"{state}"
    )


def fanout_line(fanout: dict[str, Any]) -> str:
    return (
        f"fan-out: {fanout['serving']}/{fanout['devices']} devices serving the new model "
        f"{fmt(fanout.get('seconds'), 1)} s after the PUT "
        f"({fmt(fanout.get('devices_per_s'), 0)} devices/s)"
    )


def scaling(doc: dict[str, Any]) -> list[str]:
    """Replicas side by side at each step, one replica as the reference (ratios to it)."""
    runs = [db for db in doc["databases"] if db["database"] == "postgresql" and db.get("steps")]
    if len({db.get("replicas", 1) for db in runs}) < 2:
        return []
    reference = {s["devices"]: s for db in runs if db.get("replicas", 1) == 1 for s in db["steps"]}
    ref_fanout = next((db.get("fanout") for db in runs if db.get("replicas", 1) == 1), None) or {}
    rows = [
        [
            "replicas",
            "devices",
            "samples/s",
            "p99 lag",
            "p99 / 1 replica",
            "ctrl CPU",
            "CPU / 1 replica",
            "ctrl MiB",
            "fan-out s",
            "fan-out / 1 replica",
        ]
    ]
    for db in runs:
        fanout = db.get("fanout") or {}
        for s in db["steps"]:
            ref = reference.get(s["devices"], {})
            p99 = s.get("lag", {}).get("p99_s")
            cpu = s.get("cpu_cores", {}).get("controller")
            ref_fan = ref_fanout.get("seconds") if fanout.get("devices") == s["devices"] else None
            rows.append(
                [
                    str(db.get("replicas", 1)),
                    str(s["devices"]),
                    fmt(s.get("stored_per_s"), 1),
                    fmt(p99, 3),
                    fmt(ratio(p99, ref.get("lag", {}).get("p99_s")), 2),
                    fmt(cpu, 2),
                    fmt(ratio(cpu, ref.get("cpu_cores", {}).get("controller")), 2),
                    fmt((s.get("rss_bytes", {}).get("controller") or 0) / MiB, 0),
                    fmt(fanout.get("seconds"), 2) if ref_fan is not None else "",
                    fmt(ratio(fanout.get("seconds"), ref_fan), 2) if ref_fan is not None else "",
                ]
            )
    return ["\n== replicas side by side (PostgreSQL) ==", render_table(rows)]


def report(doc: dict[str, Any]) -> str:
    out = []
    for db in doc["databases"]:
        replicas = db.get("replicas", 1)
        out.append(
            f"\n== {db['database']}, {replicas} replica{'s' if replicas > 1 else ''}, "
            f"{db.get('broker', 'mosquitto')} =="
        )
        if db.get("status") != "ok":
            out.append(f"{db.get('status')}: {db.get('reason')}")
            if not db.get("steps"):
                continue
        enrollment = db.get("enrollment") or {}
        out.append(
            f"controller idle RSS {fmt((db.get('controller_idle_rss_bytes') or 0) / MiB, 0)} MiB; "
            f"enrollment {enrollment.get('devices')} devices in {enrollment.get('seconds')} s "
            f"({fmt(enrollment.get('per_s'), 1)}/s)"
        )
        rows = [
            [
                "devices",
                "held",
                "samples/s",
                "ref/s",
                "rate ratio",
                "lag p50",
                "p95",
                "p99",
                "ref p99",
                "p99 ratio",
                "missing",
                "ctrl CPU",
                "broker",
                "sim",
                "ref",
                "db",
                "other",
                "KiB/dev",
                "broker MiB",
                "status",
            ]
        ]
        for s in db["steps"]:
            lag = s.get("lag", {})
            ref = s.get("reference", {})
            cpu = s.get("cpu_cores", {})
            rss_b = s.get("rss_bytes", {})
            held = min(s.get("connected_min", 0), s.get("controller_online_min") or s["devices"])
            rows.append(
                [
                    str(s["devices"]),
                    str(held),
                    fmt(s.get("stored_per_s"), 1),
                    fmt(ref.get("received_per_s"), 1),
                    fmt(ratio(s.get("stored_per_s"), ref.get("received_per_s")), 2),
                    fmt(lag.get("p50_s"), 3),
                    fmt(lag.get("p95_s"), 3),
                    fmt(lag.get("p99_s"), 3),
                    fmt(ref.get("lag", {}).get("p99_s"), 3),
                    fmt(ratio(lag.get("p99_s"), ref.get("lag", {}).get("p99_s")), 1),
                    str(s.get("missing", "-")),
                    f"{cpu.get('controller', 0):.0%}" if cpu else "-",
                    f"{cpu.get('broker', 0):.0%}" if cpu else "-",
                    f"{cpu.get('simulator', 0):.0%}" if cpu else "-",
                    f"{cpu.get('reference', 0):.0%}" if cpu else "-",
                    f"{cpu.get('database', 0):.0%}" if "database" in cpu else "-",
                    f"{cpu.get('other', 0):.0%}" if cpu else "-",
                    fmt((s.get("rss_per_device_bytes") or 0) / 1024, 1),
                    fmt((rss_b.get("broker") or 0) / MiB, 0),
                    "ok" if not s.get("broken") else "BROKEN: " + "; ".join(s["broken"]),
                ]
            )
        out.append(render_table(rows))
        if db.get("fanout"):
            out.append(fanout_line(db["fanout"]))
        if db.get("telemetry_bytes_per_row"):
            out.append(f"telemetry: {db['telemetry_bytes_per_row']:.0f} bytes per stored sample")
        out.append(
            f"breaks at: {db.get('breaks_at') or 'no step broke'} "
            f"(p99 lag > {doc['config']['lag_limit']:g} s, a device not connected, "
            "or samples missing)"
        )
    out.extend(scaling(doc))
    out.append(
        "\nCPU in cores (100% = one core); lag = stored_at - sent_at (controller) or arrival - "
        "sent_at (reference); ratios = controller / reference."
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def describe_machine() -> dict[str, Any]:
    """The shared description, plus the servers' versions."""
    return {
        **machine_description(),
        "mosquitto": version_of([MOSQUITTO, "-h"]),
        "postgres": version_of(["psql", "--version"]),
    }


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not like 500,1000,2000") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError("steps must be positive device counts")
    return sorted(steps)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-fleet",
        description="Benchmark the controller's telemetry ingest with simulated devices.",
    )
    parser.add_argument(
        "--devices", type=parse_steps, default=None, help=f"steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--hold", type=float, default=None, help="seconds measured per step (60)")
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between a device's samples"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds after connecting, before measuring (2 intervals)",
    )
    parser.add_argument("--db", default="sqlite,postgresql", help="databases: sqlite, postgresql")
    parser.add_argument(
        "--replicas",
        type=parse_steps,
        default=[1],
        help="controller replicas on PostgreSQL, e.g. 1,2,3, behind haproxy (1)",
    )
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="mosquitto",
        help="one Mosquitto, or a 3-node NATS cluster behind haproxy (mosquitto)",
    )
    parser.add_argument(
        "--nats-consumer-replicas",
        type=int,
        default=None,
        help="NATS's mqtt.consumer_replicas: 1 holds connect storms, 3 (default) node loss",
    )
    parser.add_argument(
        "--fanout", action="store_true", help="time one desired state reaching every device"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50 devices, 15 s")
    parser.add_argument("--sim-processes", type=int, default=1, help="simulator processes per step")
    parser.add_argument(
        "--lag-limit", type=float, default=2.0, help="p99 lag (s) above which a step breaks"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every step even after one breaks"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=180.0, help="seconds for all devices to connect"
    )
    parser.add_argument(
        "--enroll-timeout", type=float, default=1800.0, help="seconds to enroll every device"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (bench-results/fleet-<UTC>.json)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folders (logs, databases)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices = args.devices or [50]
        args.hold = args.hold if args.hold is not None else 15.0
    args.devices = args.devices or parse_steps(DEFAULT_STEPS)
    args.hold = args.hold if args.hold is not None else 60.0
    args.warmup = args.warmup if args.warmup is not None else 2 * args.interval
    args.databases = [d.strip() for d in args.db.split(",") if d.strip()]
    unknown = set(args.databases) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown database(s): {', '.join(sorted(unknown))}")
    if args.sim_processes < 1:
        parser.error("--sim-processes must be at least 1")
    return args


def raise_open_files_limit() -> None:
    """Mosquitto and the simulator each hold a socket per device; they inherit this limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    started = dt.datetime.now(dt.UTC)
    machine = describe_machine()
    busy0, _ = machine_cpu()
    time.sleep(2.0)
    busy1, _ = machine_cpu()
    machine["busy_cores_at_start"] = round((busy1 - busy0) / 2.0, 2)
    if machine["busy_cores_at_start"] > 0.2:
        log(
            f"warning: the machine is already busy ({machine['busy_cores_at_start']:.0%} "
            "of a core): expect noisy figures"
        )
    log(
        f"steps {args.devices}, hold {args.hold:g} s, interval {args.interval:g} s, "
        f"databases {', '.join(args.databases)}"
    )
    doc: dict[str, Any] = {
        "benchmark": "fleet",
        "started_utc": started.isoformat(timespec="seconds"),
        "config": {
            "steps": args.devices,
            "hold_s": args.hold,
            "interval_s": args.interval,
            "warmup_s": args.warmup,
            "databases": args.databases,
            "replicas": args.replicas,
            "broker": args.broker,
            "nats_consumer_replicas": args.nats_consumer_replicas,
            "fanout": args.fanout,
            "sim_processes": args.sim_processes,
            "lag_limit_s": args.lag_limit,
            "lag_limit": args.lag_limit,
            "keep_going": args.keep_going,
            "quick": args.quick,
        },
        "machine": machine,
        "databases": [],
    }
    for kind in args.databases:
        for replicas in args.replicas if kind == "postgresql" else [1]:
            doc["databases"].append(run_database(args, kind, args.devices, replicas))
    doc["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    name = "fleet" if args.replicas == [1] else "scale"
    name += "" if args.broker == "mosquitto" else f"-{args.broker}"
    out = args.out or REPO / "bench-results" / f"{name}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(report(doc))
    print(f"\nJSON: {out}")
    return 0 if all(db.get("status") in {"ok", "skipped"} for db in doc["databases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
