#!/usr/bin/env python3
"""Benchmark the dashboard's pages on a seeded fleet: their server time, beside the JSON API.

For each database (``sqlite``: a file in a temporary folder; ``postgres``: a fresh
database on the server named by ``EDGEFLEET_TEST_POSTGRES_URL``, dropped afterwards):

1. seed it (:mod:`fleet.simulate.seed`: ``--devices`` devices in groups, with tags,
   states, ``--days`` days of telemetry every ``--interval-min`` minutes, events, three
   rollouts, one of them live), timing each table;
2. start a real Mosquitto and ``edgefleet serve`` on free ports (``scripts/servers.py``),
   with the heartbeat interval stretched so the seeded online devices stay online, wait
   until it is ready and its start-up work (republishing every desired state) is done;
3. for each page, ``--warmup`` requests, then ``--requests`` sequential requests, each
   followed by the REFERENCE: the JSON API route(s) that give the same data. Device ids,
   list pages, sorts, searches and filters change with every request, so no cache (the
   database's or the controller's) serves the same answer twice in a row.

The pages: the device list (``/ui/devices``, paged, sorted, filtered), a device's page
(``/ui/devices/{id}``: state, 24 h telemetry charts, events), the fleet overview
(``/ui/``) and the charts it loads right after (``/ui/overview/charts``), and the live
rollout (``/ui/rollouts/{id}``). A page that answers 404 is reported as missing, so the
script runs before the dashboard has every page.

Server time is the controller's own, from a ``Server-Timing: app;dur=<ms>`` header when
the response has one, else the wall time of the request on loopback (an upper bound:
it adds the HTTP round trip). The table says which, per row; ratios compare like with
like (wall with wall unless both sides have the header). The goal: p95 under 300 ms.

Results go to a table on stdout and ``--out``/dashboard-<UTC>.json; progress to stderr.
The machine should be idle: the script warns, in its output and its JSON, when other
processes used the CPUs before or during a run. See docs/benchmarks.md, "Dashboard".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchlib import (  # noqa: E402 - scripts/ is on sys.path when a script runs
    fmt,
    machine_cpu,
    machine_description,
    make_log,
    percentile,
    render_table,
    tail,
    tree_cpu_seconds,
    version_of,
)
from servers import MOSQUITTO, MosquittoBroker, postgres_database, running_controller  # noqa: E402

log = make_log("bench-dashboard")

GOAL_MS = 300.0  # p95 server time of each page
READY_S = 300.0  # for the controller: start-up on a big database on a busy 2-core machine
SETTLE_MAX_S = 120.0
BACKENDS = {"sqlite": "sqlite", "postgres": "postgres", "postgresql": "postgres"}
PER_PAGE = 50
SORTS = ("name", "last_seen", "group", "agent", "status")  # the device list's
MiB = 1024 * 1024


# --------------------------------------------------------------------------- what is asked


@dataclass(frozen=True)
class Fleet:
    """What the seeded database holds that the requests vary over."""

    devices: list[str]
    groups: list[str]
    tags: list[str]
    rollout: str  # the live one
    names: list[str] = field(default_factory=list)  # search terms that match some devices


@dataclass(frozen=True)
class Request:
    """One measured request: a page and the API route(s) that give the same data."""

    page: str
    reference: list[str]


def _query(path: str, params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def device_list(fleet: Fleet, i: int, rng: random.Random) -> Request:
    """A page of the list: every request another page, sort, order, and some filters."""
    params: dict[str, Any] = {"sort": SORTS[i % len(SORTS)], "order": ("asc", "desc")[i % 2]}
    api: dict[str, Any] = {"limit": PER_PAGE}
    if i % 3 == 1:
        params["group"] = api["group"] = rng.choice(fleet.groups)
    if i % 5 == 2:
        params["tag"] = api["tag"] = rng.choice(fleet.tags)
    if i % 4 == 3 and fleet.names:
        params["q"] = api["q"] = rng.choice(fleet.names)
    if i % 6 == 4:
        params["status"] = api["status"] = ("online", "offline")[i % 2]
    filtered = len(params) > 2
    pages = 2 if filtered else max(1, len(fleet.devices) // PER_PAGE)
    page = 1 + rng.randrange(pages)
    params["page"] = page
    api["offset"] = (page - 1) * PER_PAGE
    return Request(_query("/ui/devices", params), [_query("/api/v1/devices", api)])


def device_page(fleet: Fleet, _i: int, rng: random.Random) -> Request:
    """A random device: its page, or its detail, 24 h of telemetry and its latest events."""
    device = rng.choice(fleet.devices)
    until = dt.datetime.now(dt.UTC)
    day = {"since": (until - dt.timedelta(hours=24)).isoformat(), "until": until.isoformat()}
    month = {"since": (until - dt.timedelta(days=30)).isoformat(), "until": until.isoformat()}
    base = f"/api/v1/devices/{device}"
    return Request(
        f"/ui/devices/{device}",
        [
            base,
            _query(f"{base}/telemetry", {**day, "bucket_s": 300}),
            _query(f"{base}/events", {**month, "limit": 25}),
        ],
    )


def overview(_fleet: Fleet, _i: int, _rng: random.Random) -> Request:
    return Request("/ui/", ["/api/v1/status"])


def overview_charts(_fleet: Fleet, _i: int, _rng: random.Random) -> Request:
    return Request("/ui/overview/charts", ["/api/v1/telemetry/summary?window_s=86400"])


def live_rollout(fleet: Fleet, _i: int, _rng: random.Random) -> Request:
    return Request(f"/ui/rollouts/{fleet.rollout}", [f"/api/v1/rollouts/{fleet.rollout}"])


@dataclass(frozen=True)
class Page:
    name: str
    route: str  # as the table shows it
    make: Callable[[Fleet, int, random.Random], Request]


PAGES = (
    Page("device list", "/ui/devices?page=&sort=&q=&group=&tag=&status=", device_list),
    Page("device detail", "/ui/devices/{id}", device_page),
    Page("fleet overview", "/ui/", overview),
    Page("overview charts", "/ui/overview/charts", overview_charts),
    Page("live rollout", "/ui/rollouts/{id}", live_rollout),
)


# --------------------------------------------------------------------------- timing


def server_timing_ms(header: str | None) -> float | None:
    """The ``app`` metric's duration in a ``Server-Timing`` header, None when absent."""
    if not header:
        return None
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if name != "app":
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                try:
                    return float(value.strip().strip('"'))
                except ValueError:
                    return None
    return None


@dataclass
class Timed:
    """One request's wall time, and its Server-Timing when it sent one (ms)."""

    status: int
    wall_ms: float
    server_ms: float | None


def timed_get(http: httpx.Client, path: str) -> Timed:
    started = time.perf_counter()
    response = http.get(path)
    response.read()
    wall = (time.perf_counter() - started) * 1000
    return Timed(
        response.status_code, wall, server_timing_ms(response.headers.get("server-timing"))
    )


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "max_ms": max(values) if values else None,
    }


def series(timings: Sequence[Timed], timing: str) -> list[float]:
    """Each request's time by ``timing`` ("server" or "wall"); a request of parts sums them."""
    if timing == "server":
        return [t.server_ms for t in timings if t.server_ms is not None]
    return [t.wall_ms for t in timings]


def timing_of(timings: Sequence[Timed]) -> str:
    """ "server" when every response sent Server-Timing, else "wall"."""
    if timings and all(t.server_ms is not None for t in timings):
        return "server"
    return "wall"


def combine(parts: Sequence[Timed]) -> Timed:
    """A reference of several API calls: their times added (they run one after another)."""
    servers = [p.server_ms for p in parts]
    return Timed(
        max(p.status for p in parts),
        sum(p.wall_ms for p in parts),
        None if any(s is None for s in servers) else sum(s for s in servers if s is not None),
    )


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def judge(p95_ms: float | None, goal_ms: float = GOAL_MS) -> str:
    if p95_ms is None:
        return "-"
    return "met" if p95_ms < goal_ms else "NOT met"


def measure_page(
    http: httpx.Client, page: Page, fleet: Fleet, requests: int, warmup: int, seed: int
) -> dict[str, Any]:
    """Warm up, then time the page and its reference alternately, request by request."""
    rng = random.Random(f"{seed}:{page.name}")  # which device, which page
    probe = page.make(fleet, 0, rng)
    first = timed_get(http, probe.page)
    if first.status == 404:
        return {"name": page.name, "route": page.route, "status": "missing"}
    pages: list[Timed] = []
    references: list[Timed] = []
    errors: dict[str, int] = {}
    for i in range(1, warmup + requests + 1):
        request = page.make(fleet, i, rng)
        shown = timed_get(http, request.page)
        reference = combine([timed_get(http, path) for path in request.reference])
        for what, got in (("page", shown), ("reference", reference)):
            if got.status != 200:
                key = f"{what} {got.status}"
                errors[key] = errors.get(key, 0) + 1
        if i > warmup:
            pages.append(shown)
            references.append(reference)
    page_timing, ref_timing = timing_of(pages), timing_of(references)
    both = "server" if page_timing == ref_timing == "server" else "wall"
    result: dict[str, Any] = {
        "name": page.name,
        "route": page.route,
        "example": probe.page,
        "reference_routes": probe.reference,
        "status": "ok" if not errors else "errors",
        "errors": errors,
        "timing": page_timing,
        "page": summary(series(pages, page_timing)),
        "page_wall": summary(series(pages, "wall")),
        "reference_timing": ref_timing,
        "reference": summary(series(references, ref_timing)),
        "reference_wall": summary(series(references, "wall")),
        "ratio_timing": both,
    }
    compared_page = summary(series(pages, both))
    compared_ref = summary(series(references, both))
    result["ratio_p50"] = ratio(compared_page["p50_ms"], compared_ref["p50_ms"])
    result["ratio_p95"] = ratio(compared_page["p95_ms"], compared_ref["p95_ms"])
    result["goal"] = judge(result["page"]["p95_ms"])
    return result


# --------------------------------------------------------------------------- one backend


class SkippedError(RuntimeError):
    pass


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{root / 'fleet.db'}"
        return
    admin = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL")
    if not admin:
        raise SkippedError(
            "no PostgreSQL: set EDGEFLEET_TEST_POSTGRES_URL (scripts/bench-dashboard does)"
        )
    with postgres_database(admin) as url:
        yield url


def database_pids(url: str) -> list[int]:
    """The PostgreSQL backends serving this database (other databases' count as "other")."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            mine = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            return [int(pid) for pid in conn.exec_driver_sql(query).scalars() if pid != mine]
    finally:
        engine.dispose()


class CpuWindow:
    """Cores used between two marks: the machine's, the controller's, the database's, ours."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.at = time.monotonic()
        self.busy, self.steal = machine_cpu()
        self.used = {role: tree_cpu_seconds(pids) for role, pids in roles.items()}

    def cores(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.at, 1e-6)
        busy, steal = machine_cpu()
        used = {r: (tree_cpu_seconds(p) - self.used[r]) / elapsed for r, p in self.roles.items()}
        machine = (busy - self.busy) / elapsed
        return {
            **used,
            "machine": machine,
            "steal": (steal - self.steal) / elapsed,
            "other": max(0.0, machine - (steal - self.steal) / elapsed - sum(used.values())),
        }


def settle(pid: int, window_s: float = 2.0, below: float = 0.5) -> float:
    """Wait until the controller's start-up work is done (CPU under ``below`` cores); seconds."""
    started = time.monotonic()
    time.sleep(window_s)
    while time.monotonic() - started < SETTLE_MAX_S:
        mark = tree_cpu_seconds([pid])
        time.sleep(window_s)
        if (tree_cpu_seconds([pid]) - mark) / window_s < below:
            break
    return time.monotonic() - started


def seed_database(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from fleet.db import make_engine
    from fleet.simulate.seed import SeedConfig, seed

    config = SeedConfig(
        devices=args.devices, days=args.days, interval_min=args.interval_min, seed=args.seed
    )
    engine = make_engine(url)
    try:
        result = seed(engine, config)
    finally:
        engine.dispose()
    return {
        **result.summary(),
        "device_ids": result.device_ids,
        "names": sorted({g.split("-", 1)[1] for g in result.groups}),  # sites in device names
    }


def measure_run(
    args: argparse.Namespace,
    kind: str,
    root: Path,
    url: str,
    broker_args: list[str],
    env: dict[str, str],
    seeded: dict[str, Any],
    run: dict[str, Any],
) -> Path:
    """One measurement run against a freshly started controller; the controller's log."""
    started = time.monotonic()
    with running_controller(root, url, *broker_args, env=env, ready_s=READY_S) as served:
        run["controller_ready_s"] = round(time.monotonic() - started, 2)
        run["settle_s"] = round(settle(served.proc.pid), 2)
        log(
            f"{kind} run {run['run']}: ready in {run['controller_ready_s']:.1f} s, settled "
            f"after {run['settle_s']:.1f} s more; measuring"
        )
        roles = {"controller": [served.proc.pid], "bench": [os.getpid()]}
        if kind == "postgres":
            roles["database"] = database_pids(url)
        background = CpuWindow(roles)
        time.sleep(3.0)
        run["background_cpu_cores"] = background.cores()
        fleet = Fleet(
            devices=seeded["device_ids"],
            groups=seeded["groups"],
            tags=seeded["tags"],
            rollout=seeded["rollouts"]["active"],
            names=seeded["names"],
        )
        headers = {"Authorization": f"Bearer {env['EDGEFLEET_FLEET_ADMIN_TOKEN']}"}
        with httpx.Client(base_url=served.url, headers=headers, timeout=60) as http:
            window = CpuWindow(roles)
            for page in PAGES:
                measured = measure_page(http, page, fleet, args.requests, args.warmup, args.seed)
                run["pages"].append(measured)
                log(f"  {line(measured)}")
            run["cpu_cores"] = window.cores()
        if served.proc.poll() is not None:
            raise RuntimeError("the controller exited during the run")
    return served.log


def run_backend(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-dashboard-{kind}-"))
    result: dict[str, Any] = {"backend": kind, "pages": []}
    broker = MosquittoBroker(root / "mosquitto")
    controller_log: Path | None = None
    try:
        with database(kind, root) as url:
            log(
                f"{kind}: seeding {args.devices:,} devices, {args.days:g} days of telemetry "
                f"every {args.interval_min:g} min"
            )
            seeded = seed_database(url, args)
            result["seed"] = {k: v for k, v in seeded.items() if k not in ("device_ids", "names")}
            took = seeded["seconds"]["total"]
            log(f"{kind}: seeded in {took:.1f} s; starting Mosquitto and the controller")
            broker.start()
            admin_token = secrets.token_urlsafe(24)
            env = {
                "EDGEFLEET_FLEET_ADMIN_TOKEN": admin_token,
                "EDGEFLEET_FLEET_BROKER_PASSWORD": secrets.token_urlsafe(24),
                # Seeded devices never send heartbeats: keep the online ones online.
                "EDGEFLEET_FLEET_HEARTBEAT_INTERVAL_S": str(30 * 86400),
            }
            broker_args = [
                "--broker", broker.url, "--broker-auth-dir", str(broker.auth_dir),
                "--broker-pid-file", str(broker.pid_file),
            ]  # fmt: skip
            result["runs"] = []
            for number in range(1, args.runs + 1):
                run: dict[str, Any] = {"run": number, "pages": []}
                result["runs"].append(run)
                controller_log = measure_run(args, kind, root, url, broker_args, env, seeded, run)
        result["status"] = "ok"
    except SkippedError as exc:
        log(f"{kind}: SKIPPED: {exc}")
        result.update(status="skipped", reason=str(exc))
    except (
        RuntimeError,
        OSError,
        AssertionError,
        ValueError,
        subprocess.SubprocessError,
        httpx.HTTPError,
    ) as exc:
        log(f"{kind}: FAILED: {type(exc).__name__}: {exc}")
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        broker.kill()
        if controller_log is not None:
            result["controller_log_tail"] = tail(controller_log)
        if args.keep:
            log(f"{kind}: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def line(page: dict[str, Any]) -> str:
    if page["status"] == "missing":
        return f"{page['name']}: missing (404)"
    p, r = page["page"], page["reference"]
    return (
        f"{page['name']}: p50 {fmt(p['p50_ms'], 1)} ms, p95 {fmt(p['p95_ms'], 1)} ms "
        f"({page['timing']}); API p95 {fmt(r['p95_ms'], 1)} ms; goal {page['goal']}"
        + (f"; errors {page['errors']}" if page.get("errors") else "")
    )


HEADER = [
    "page", "timing", "n", "p50 ms", "p95 ms", "max ms", "API p50", "API p95", "API max",
    "p50 ratio", "p95 ratio", f"p95 < {GOAL_MS:g} ms",
]  # fmt: skip


def page_row(page: dict[str, Any]) -> list[str]:
    if page["status"] == "missing":
        return [page["name"], "-", "0", "-", "-", "-", "-", "-", "-", "-", "-", "missing"]
    p, r = page["page"], page["reference"]
    goal = page["goal"] + (" (errors)" if page.get("errors") else "")
    return [
        page["name"],
        page["timing"]
        if page["timing"] == page["reference_timing"]
        else f"{page['timing']}/{page['reference_timing']}",
        str(p["n"]),
        fmt(p["p50_ms"], 1),
        fmt(p["p95_ms"], 1),
        fmt(p["max_ms"], 1),
        fmt(r["p50_ms"], 1),
        fmt(r["p95_ms"], 1),
        fmt(r["max_ms"], 1),
        fmt(page.get("ratio_p50"), 2),
        fmt(page.get("ratio_p95"), 2),
        goal,
    ]


def report(doc: dict[str, Any]) -> str:
    out = []
    for backend in doc["backends"]:
        seeded = backend.get("seed") or {}
        rows = seeded.get("rows") or {}
        took = (seeded.get("seconds") or {}).get("total")
        out.append(
            f"\n== {backend['backend']}: {rows.get('devices', 0):,} devices, "
            f"{rows.get('telemetry', 0):,} telemetry samples, {rows.get('events', 0):,} events "
            f"(seeded in {fmt(took, 1)} s) =="
        )
        if backend.get("status") != "ok":
            out.append(f"{backend.get('status')}: {backend.get('reason')}")
        runs = backend.get("runs") or [backend]
        for run in runs:
            if not run.get("pages"):
                continue
            if len(runs) > 1:
                out.append(f"-- run {run['run']} (a fresh controller on the same data)")
            out.append(render_table([HEADER, *(page_row(p) for p in run["pages"])]))
            cpu = run.get("background_cpu_cores")
            if cpu:
                out.append(
                    f"controller busy {cpu.get('controller', 0):.0%} of a core before the "
                    "first request (the rollout engine's steps, presence, ingest)"
                )
    out.append(
        "\ntiming: server = the response's Server-Timing app;dur, wall = the request's wall "
        "time on loopback (includes the HTTP round trip). API = the JSON route(s) for the "
        "same data (a device: its detail + 24 h telemetry + events, one after another); "
        "ratios = page / API, like with like."
    )
    for warning in doc.get("warnings", []):
        out.append(f"WARNING: {warning}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_backends(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"backends are sqlite and postgres, not {text!r}")
    return list(dict.fromkeys(BACKENDS[n] for n in names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-dashboard",
        description="Server time of the dashboard's pages on a seeded fleet, beside the API.",
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=7.0, help="of telemetry")
    parser.add_argument(
        "--interval-min", type=float, default=15.0, help="minutes between a device's samples"
    )
    parser.add_argument("--backends", type=parse_backends, default=["sqlite", "postgres"])
    parser.add_argument("--requests", type=int, default=50, help="measured requests per page")
    parser.add_argument("--warmup", type=int, default=5, help="requests per page not measured")
    parser.add_argument("--seed", type=int, default=0, help="of the fleet and of the requests")
    parser.add_argument(
        "--max-contention",
        type=float,
        default=0.15,
        help="cores other processes may use before the figures are flagged",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench-results", help="folder for the JSON"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=2,
        help="measurement runs per seeded database, each "
        "with a freshly started controller (seeding is the slow part)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.devices < 1:
        parser.error("--requests and --devices must be at least 1, --warmup at least 0")
    return args


def contention_warnings(doc: dict[str, Any], limit: float) -> list[str]:
    warnings = []
    before = doc["machine"].get("busy_cores_at_start", 0.0)
    if before > limit:
        warnings.append(
            f"the machine was busy before the run ({before:.2f} cores): expect noisy figures"
        )
    for backend in doc["backends"]:
        for run in backend.get("runs") or [backend]:
            cpu = run.get("cpu_cores") or {}
            other = cpu.get("other", 0.0) + cpu.get("steal", 0.0)
            if other > limit:
                warnings.append(
                    f"{backend['backend']}: other processes (and the hypervisor) used "
                    f"{other:.2f} cores while it was measured: its figures are not "
                    "trustworthy; rerun it on an idle machine"
                )
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    machine = {
        **machine_description(),
        "mosquitto": version_of([MOSQUITTO, "-h"]),
        "postgres": version_of(["psql", "--version"]),
    }
    busy0, _ = machine_cpu()
    time.sleep(2.0)
    busy1, _ = machine_cpu()
    machine["busy_cores_at_start"] = round((busy1 - busy0) / 2.0, 2)
    if machine["busy_cores_at_start"] > args.max_contention:
        log(
            f"warning: the machine is already busy ({machine['busy_cores_at_start']:.2f} cores): "
            "expect noisy figures"
        )
    doc: dict[str, Any] = {
        "benchmark": "dashboard",
        "started_utc": started.isoformat(timespec="seconds"),
        "config": {
            "devices": args.devices,
            "days": args.days,
            "interval_min": args.interval_min,
            "backends": args.backends,
            "requests": args.requests,
            "warmup": args.warmup,
            "seed": args.seed,
            "goal_p95_ms": GOAL_MS,
        },
        "machine": machine,
        "backends": [],
    }
    for kind in args.backends:
        doc["backends"].append(run_backend(args, kind))
    doc["warnings"] = contention_warnings(doc, args.max_contention)
    doc["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"dashboard-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(report(doc))
    print(f"\nJSON: {out}")
    return 0 if all(b.get("status") in {"ok", "skipped"} for b in doc["backends"]) else 1


if __name__ == "__main__":
    sys.exit(main())
