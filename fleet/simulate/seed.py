"""Fill a controller database with a realistic fleet, fast: for the dashboard and its benchmark.

``python -m fleet.simulate.seed --database-url URL --devices 10000 --days 7 --interval-min 15``
migrates the database (:func:`fleet.db.migrate`), refuses one that already holds
devices, and writes, the same rows for the same ``--seed`` and ``--now``:

- users ``alice`` (admin), ``bob`` (operator) and ``carol`` (viewer), the people in the
  audit trail, each with the password ``edgefleet-seed``: a seeded database is for
  development and benchmarks, never for production;
- groups (sites, each with a time zone and an enrollment token) and devices in them, with
  tags, hardware reports drawn from :data:`~fleet.simulate.hardware.HARDWARE`, agent
  versions, and a mix of standings: online (seen in the last minute), offline (gone for
  minutes to weeks), never connected since enrolling, revoked;
- a registered model, ``gemma3-270m`` 1.0, 1.1 and 1.2 in two variants, and an embedder,
  ``minilm-l6`` 1.0 and 2.0 (yanked);
- each device's desired state (signed targets of those models) and reported state (what
  it serves, some models degraded, some devices drifting from what they should run);
- telemetry: a sample per device every ``--interval-min`` minutes over ``--days`` days,
  from enrollment (or the range's start) until the device was last seen, with gaps, load
  that follows the device's local day and numbers that fit its hardware, stored in time
  order across devices as the ingest stores them (so a device's rows are spread over the
  table, not packed together);
- events: connects and disconnects, agent restarts, downloads and installs, health
  checks passed and rolled back, breaker transitions, out-of-memory failures;
- three rollouts as the engine (:mod:`fleet.rollout.engine`) would leave them, with
  their gate checks and evidence and audit trails: one completed six days ago, one
  aborted by an abort rule after failed health checks, and one active, in its second
  stage with devices updated, updating, queued, timed out, failed and ineligible. The
  engine's next steps change nothing for about 45 minutes: every updating device has
  time left and the concurrency cap is full.

Rows are shaped as the controller's own writers shape them and written in bulk:
SQLAlchemy Core executemany in batches on SQLite, ``COPY`` on PostgreSQL (several times
faster for millions of telemetry rows), then ``ANALYZE`` on PostgreSQL so its planner
knows the tables' sizes at once, as autovacuum would tell it a minute later. Nothing
passes through the API or the broker, so none of their checks vouch for these rows:
``tests/fleet/test_seed.py`` reads them back through the controller's own read paths.

The layering allows this module only what lies below :mod:`fleet.simulate`
(:mod:`fleet.db`, :mod:`fleet.tables`, :mod:`models`), so the rollout plan's device rank
and stage quotas, a spec's defaults and the registry's target paths are restated here;
the test checks that they agree with the originals.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, TextIO

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.low_level import hash_secret
from sqlmodel import SQLModel

from fleet.db import make_engine, migrate
from fleet.errors import Conflict, FleetError
from fleet.simulate.hardware import HARDWARE, Hardware
from fleet.simulate.telemetry import MB, DeviceProfile
from fleet.tables import Device
from models.policy import FailureKind
from models.wire import (
    DESIRED_LIFETIME,
    BreakerState,
    DegradedModel,
    DesiredModel,
    DesiredState,
    EventKind,
    ModelState,
    ReportedModel,
    ReportedState,
    Severity,
    TargetRef,
)

__all__ = [
    "SEED_PASSWORD",
    "TELEMETRY_COLUMNS",
    "USERS",
    "SeedConfig",
    "SeedResult",
    "device_rank",
    "main",
    "rollout_spec",
    "seed",
    "stage_quotas",
    "target_path",
]

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# (site, IANA zone, UTC offset in hours for the local day's load curve)
_SITES = (
    ("berlin", "Europe/Berlin", 1), ("munich", "Europe/Berlin", 1),
    ("hamburg", "Europe/Berlin", 1), ("lyon", "Europe/Paris", 1),
    ("paris", "Europe/Paris", 1), ("madrid", "Europe/Madrid", 1),
    ("milan", "Europe/Rome", 1), ("warsaw", "Europe/Warsaw", 1),
    ("london", "Europe/London", 0), ("dublin", "Europe/Dublin", 0),
    ("austin", "America/Chicago", -6), ("denver", "America/Denver", -7),
    ("seattle", "America/Los_Angeles", -8), ("toronto", "America/Toronto", -5),
    ("boston", "America/New_York", -5), ("sao-paulo", "America/Sao_Paulo", -3),
    ("osaka", "Asia/Tokyo", 9), ("seoul", "Asia/Seoul", 9),
    ("singapore", "Asia/Singapore", 8), ("sydney", "Australia/Sydney", 10),
)  # fmt: skip
_ROLES = ("retail", "factory", "clinic", "depot")
_KINDS = ("kiosk", "camera", "voice", "assistant", "robot")
_LINKS = ("wifi", "ethernet", "lte")
_EXTRA_TAGS = (("outdoor", 0.15), ("beta-ring", 0.10), ("pilot", 0.05), ("lab", 0.02))
_HARDWARE_MIX = {
    "pi4-4g": 24, "x86-cpu-2g": 4, "x86-cpu-8g": 15, "x86-cpu-16g": 10, "orin-nano-8g": 25,
    "orin-agx-32g": 8, "orin-agx-64g": 2, "x86-rtx3060-16g": 8, "x86-rtx4090-64g": 4,
}  # fmt: skip
_AGENT_VERSIONS = {"0.9.3": 70, "0.9.2": 20, "0.8.7": 10}
# Load by local hour: quiet nights, busy afternoons (a multiplier of the base rate).
_DIURNAL = tuple(0.35 + 1.3 * max(0.0, math.sin(math.pi * (h - 6) / 15)) for h in range(24))
_BREAKER_REASONS = {
    "slow": "7 of the last 20 calls took longer than 8 s",
    "error": "12 of the last 20 calls failed: llama_decode returned -1",
    "overloaded": "queue full: 32 requests waiting",
    "thermal": "GPU at 91 C, clocks throttled",
    "gpu_fault": "CUDA error: an illegal memory access was encountered",
    "out_of_memory": "the memory budget is exhausted: 3.6 GiB of 3.6 GiB",
}
_GOLDEN_FAILURE = "golden prompt 'capital-of-france' answered 'I cannot help' (wanted 'Paris')"

GEMMA = "gemma3-270m"
MINILM = "minilm-l6"
LOW_RAM_BYTES = 3 * 10**9  # CPU-only devices below this fit no variant of gemma3-270m 1.1+
HEALTH_CHECK_FAILED = "health_check_failed"  # fleet.rollout.spec.FailureKind
TIMED_OUT = "timed_out"
ENGINE = "controller"  # fleet.audit.ENGINE: the actor of the engine's decisions
ADMIN_SOURCE = "10.20.0.7 (api token)"
USERS = {"alice": "admin", "bob": "operator", "carol": "viewer"}  # the audit trail's people
SEED_PASSWORD = "edgefleet-seed"  # noqa: S105 - every seeded user's; for development only

TELEMETRY_COLUMNS = (
    "device_id", "sample_id", "seq", "ts", "window_s", "requests", "errors", "rejections",
    "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "tokens_per_s", "queue_depth",
    "model_memory_bytes", "process_memory_bytes", "gpu_utilization_percent",
    "gpu_memory_used_bytes", "gpu_temperature_c", "gpu_power_w", "fallbacks",
    "fallbacks_by_tier", "sent_at", "stored_at",
)  # fmt: skip
"""The telemetry row's columns, in the order the generator yields them."""


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(digits * 4):0{digits}x}"


def _seconds(rng: random.Random, low: float, high: float) -> timedelta:
    return timedelta(seconds=_uniform(rng, low, high))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SeedConfig:
    """What to seed; the same config (``now`` included) always writes the same rows."""

    devices: int = 10_000
    days: float = 7.0  # of telemetry, ending at ``now``
    interval_min: float = 15.0  # minutes between a device's telemetry samples
    seed: int = 0
    now: datetime | None = None  # the moment the fleet is seeded at; None: the current second
    batch_rows: int = 5_000  # rows per executemany (SQLite); COPY sends 20 times as many

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if not 0 < self.days <= 60:
            raise ValueError("days must be in (0, 60]")
        if not 0.1 <= self.interval_min <= 24 * 60:
            raise ValueError("interval_min must be in [0.1, 1440]")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        if self.now is not None and self.now.tzinfo is None:
            raise ValueError("now must be timezone-aware")

    def moment(self) -> datetime:
        now = self.now or datetime.now(UTC).replace(microsecond=0)
        return now.astimezone(UTC)


@dataclass
class SeedResult:
    """What was written: rows and seconds per table, and what a caller may look up."""

    now: datetime
    rows: dict[str, int]
    seconds: dict[str, float]  # per table, and "total" (planning and migrating included)
    rollouts: dict[str, str]  # "completed", "aborted", "active" -> rollout id
    groups: list[str]
    tags: list[str]
    device_ids: list[str]  # in enrollment order

    def summary(self) -> dict[str, Any]:
        """The result as JSON, without the device ids."""
        return {
            "now": self.now.isoformat(),
            "rows": self.rows,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "rollouts": self.rollouts,
            "groups": self.groups,
            "tags": self.tags,
            "devices": len(self.device_ids),
        }


# --------------------------------------------------------------------------- progress


class _Progress:
    """Rows per second on ``out``: a line every ``every_s`` and one when a table is done."""

    def __init__(self, out: TextIO | None, every_s: float = 2.0) -> None:
        self._out = out
        self._every_s = every_s
        self._what = ""
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._last = 0.0

    def start(self, what: str, total: int | None) -> None:
        self._what, self._total, self._done = what, total, 0
        self._started = self._last = time.monotonic()

    def add(self, rows: int) -> None:
        self._done += rows
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._say(now, final=False)

    def finish(self) -> float:
        now = time.monotonic()
        self._say(now, final=True)
        return now - self._started

    def note(self, message: str) -> None:
        if self._out is not None:
            print(f"seed: {message}", file=self._out, flush=True)

    def _say(self, now: float, *, final: bool) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / elapsed
        if final:
            self.note(f"{self._what}: {self._done:,} rows in {elapsed:.1f} s ({rate:,.0f} rows/s)")
            return
        of = f" of {self._total:,}" if self._total else ""
        left = ""
        if self._total and rate > 0:
            left = f", {max(0.0, (self._total - self._done) / rate):.0f} s left"
        self.note(f"{self._what}: {self._done:,}{of} rows ({rate:,.0f} rows/s{left})")


# --------------------------------------------------------------------------- writing


def _batched(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


class _Writer:
    """Bulk rows into tables over one connection: ``COPY`` on PostgreSQL, else executemany.

    A big table's plain indexes are dropped while it loads and built again after it:
    building an index once from sorted keys is far cheaper than millions of inserts at
    random places in it. Its unique constraints stay, so a duplicate still fails.
    """

    SQLITE_CACHE_KIB = 256 * 1024  # SQLite's page cache while seeding (its default is 2 MiB)
    REBUILD_FROM_ROWS = 50_000  # tables loaded with more rows than this build indexes after

    def __init__(self, conn: sa.Connection, batch_rows: int, progress: _Progress) -> None:
        self._conn = conn
        self._batch_rows = batch_rows
        self._progress = progress
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA cache_size=-{self.SQLITE_CACHE_KIB}")
            conn.commit()

    def dicts(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Rows as dicts; keys the table lacks (a column another version added) are left out."""
        table = SQLModel.metadata.tables[name]
        columns = [c for c in rows[0] if c in table.c] if rows else []
        self.tuples(name, columns, (tuple(row[c] for c in columns) for row in rows), len(rows))

    def tuples(
        self,
        name: str,
        columns: Sequence[str],
        rows: Iterable[tuple[Any, ...]],
        total: int | None = None,
    ) -> None:
        table = SQLModel.metadata.tables[name]
        self._progress.start(name, total)
        big = (total or 0) > self.REBUILD_FROM_ROWS
        indexes = [i for i in table.indexes if not i.unique] if big else []
        with self._conn.begin():
            for index in indexes:
                index.drop(self._conn)
        if self._conn.dialect.name == "postgresql":
            written = self._copy(table, columns, rows)
        else:
            written = self._insert(table, columns, rows)
        if indexes:
            self._progress.note(f"{name}: building {len(indexes)} index(es)")
        with self._conn.begin():
            for index in indexes:
                index.create(self._conn)
        self.rows[name] = written
        self.seconds[name] = self._progress.finish()

    def _insert(
        self, table: sa.Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
    ) -> int:
        written = 0
        statement = sa.insert(table)
        for batch in _batched(rows, self._batch_rows):
            with self._conn.begin():
                self._conn.execute(statement, [dict(zip(columns, r, strict=True)) for r in batch])
            written += len(batch)
            self._progress.add(len(batch))
        return written

    def _copy(
        self, table: sa.Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
    ) -> int:
        # JSON columns travel as JSON text, Python None as JSON null, as Core writes them.
        json_at = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
        names = ", ".join(f'"{c}"' for c in columns)
        sql = f'COPY "{table.name}" ({names}) FROM STDIN'
        written = 0
        for batch in _batched(rows, 20 * self._batch_rows):
            with self._conn.begin():
                raw: Any = self._conn.connection.driver_connection
                with raw.cursor() as cursor, cursor.copy(sql) as copy:
                    for row in batch:
                        if json_at:
                            values = list(row)
                            for i in json_at:
                                values[i] = json.dumps(values[i], separators=(",", ":"))
                            copy.write_row(values)
                        else:
                            copy.write_row(row)
            written += len(batch)
            self._progress.add(len(batch))
        return written


# --------------------------------------------------------------------------- restated rules


def target_path(name: str, version: str, variant: str, fmt: str) -> str:
    """The artifact's TUF target path (``fleet.registry.targets.target_path``)."""
    return f"{name}/{version}/{variant}.{fmt}"


def device_rank(rollout_id: str, device_id: str) -> str:
    """A device's release order in a rollout (``fleet.rollout.plan.device_rank``)."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()[:16]


def stage_quotas(canary: int | None, percents: Sequence[float], eligible: int) -> list[int]:
    """Devices released once each stage is done (``fleet.rollout.plan.stage_quotas``).

    ``canary`` is a count (a percent canary is one more entry of ``percents``).
    """

    def share(percent: float) -> int:
        return min(eligible, max(1, math.ceil(round(eligible * percent / 100, 9))))

    quotas = [min(canary, eligible)] if canary is not None else []
    quotas += [share(p) for p in percents]
    running = 0
    for i, quota in enumerate(quotas):
        running = max(running, quota)
        quotas[i] = running
    return quotas


def rollout_spec(
    name: str,
    model: str,
    version: str,
    target: dict[str, list[str]],
    canary: dict[str, float | int | None],
    percents: list[float],
    gates: list[dict[str, Any]],
    abort_rules: list[dict[str, Any]],
    **rest: Any,
) -> dict[str, Any]:
    """A model rollout's spec as the engine stores it: ``RolloutSpec.model_dump(mode="json")``."""
    gate_defaults: dict[str, Any] = {
        "window_s": 300.0, "min_samples": 3, "max_increase_percent": None,
        "max_decrease_percent": None, "max_value": None, "min_value": None,
        "on_insufficient_data": "wait", "max_consecutive_failures": 3,
    }  # fmt: skip
    rule_defaults: dict[str, Any] = {
        "failure": "any", "threshold_percent": None, "threshold_count": None, "min_devices": 1,
    }  # fmt: skip
    facts: dict[str, Any] = {"arch": [], "min_ram_bytes": None, "max_ram_bytes": None, "gpu": None}
    spec: dict[str, Any] = {
        "name": name,
        "change": {"kind": "model", "model": model, "version": version},
        "target": {"groups": [], "tags": [], "devices": [], **target,
                   "facts": {**facts, "agent_version": None}},
        "canary": {"count": None, "percent": None, **canary},
        "stages": {"kind": "waves", "percents": [float(p) for p in percents]},
        "soak_s": 600.0,
        "check_interval_s": 60.0,
        "approval": False,
        "max_concurrent": None,
        "device_timeout_s": 3600.0,
        "maintenance_window": None,
        "gates": [{**gate_defaults, **gate} for gate in gates],
        "abort_rules": [{**rule_defaults, **rule} for rule in abort_rules],
    }  # fmt: skip
    for key, value in rest.items():
        spec[key] = float(value) if key.endswith("_s") else value
    for gate in spec["gates"]:
        for key in ("window_s", "max_increase_percent", "max_value"):
            if gate[key] is not None:
                gate[key] = float(gate[key])
    for rule in spec["abort_rules"]:
        if rule["threshold_percent"] is not None:
            rule["threshold_percent"] = float(rule["threshold_percent"])
    if spec["canary"]["percent"] is not None:
        spec["canary"]["percent"] = float(spec["canary"]["percent"])
    return spec


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class _Artifact:
    name: str
    version: str
    variant: str
    format: str
    sha256: str
    size_bytes: int
    meta: dict[str, Any]
    created_at: datetime

    @property
    def path(self) -> str:
        return target_path(self.name, self.version, self.variant, self.format)

    def desired(self) -> DesiredModel:
        target = TargetRef(path=self.path, length=self.size_bytes, sha256=self.sha256)
        return DesiredModel(name=self.name, version=self.version, target=target)


def _meta(quantization: str, ram: int, vram: int | None, gpu: str, context: int) -> dict[str, Any]:
    """``fleet.api.schemas.ModelMetadata`` as the registry stores it."""
    requirements: dict[str, Any] = {
        "arch": [], "gpu": gpu, "min_compute_capability": None, "min_l4t": None, "runtimes": {},
    }  # fmt: skip
    return {
        "quantization": quantization, "quality": None, "ram_bytes": ram, "vram_bytes": vram,
        "requirements": requirements, "context_length": context, "runtime": None,
        "golden_prompts": [], "licence": None, "card": "",
    }  # fmt: skip


def _artifacts(seed: int, now: datetime) -> list[_Artifact]:
    found = []
    gemma_variants = (
        ("Q4_K_M", 253_000_000, _meta("Q4_K_M", 2_200_000_000, 420_000_000, "preferred", 32768)),
        ("Q8_0", 292_000_000, _meta("Q8_0", 2_600_000_000, 600_000_000, "required", 32768)),
    )
    for version, age in (("1.0", 60 * DAY), ("1.1", 8 * DAY), ("1.2", DAY)):
        for variant, size, meta in gemma_variants:
            digest = hashlib.sha256(f"{seed}/{GEMMA}/{version}/{variant}".encode()).hexdigest()
            found.append(_Artifact(GEMMA, version, variant, "gguf", digest, size, meta, now - age))
    for version, age in (("1.0", 90 * DAY), ("2.0", 4 * DAY)):
        digest = hashlib.sha256(f"{seed}/{MINILM}/{version}/int8".encode()).hexdigest()
        meta = _meta("int8", 120_000_000, None, "none", 512)
        found.append(
            _Artifact(MINILM, version, "int8", "onnx", digest, 23_000_000, meta, now - age)
        )
    return found


# --------------------------------------------------------------------------- devices


@dataclass
class _Issued:
    """One desired state the controller stored for a device: the versions it names."""

    at: datetime
    gemma: str
    minilm: str


Event = tuple[datetime, EventKind, Severity, str, dict[str, Any]]


@dataclass
class _Device:
    index: int
    id: str
    name: str
    group: str
    zone: str
    utc_offset_h: int
    tags: list[str]
    hardware: Hardware
    profile: DeviceProfile
    agent_version: str
    enrolled_at: datetime
    standing: str  # online, offline, never (enrolled, never connected), revoked
    last_seen: datetime | None
    revoked_at: datetime | None
    gap: tuple[datetime, datetime] | None  # offline for a while during the range
    degraded_since: datetime | None
    base_version: int  # desired versions before the first one kept in ``issued``
    dropped: int  # telemetry samples its spool lost
    issued: list[_Issued] = field(default_factory=list)
    acted_on: int = 0  # index in ``issued`` of the last desired state the agent applied
    served_gemma: str = "1.0"
    served_minilm: str = "1.0"
    changed_at: datetime | None = None  # the last update it finished
    events: list[Event] = field(default_factory=list)

    @property
    def low_ram(self) -> bool:
        return not self.hardware.has_gpu and self.hardware.ram_bytes < LOW_RAM_BYTES

    def variant(self, model: str) -> str:
        if model == MINILM:
            return "int8"
        return "Q8_0" if self.hardware.has_gpu else "Q4_K_M"

    def reachable(self, at: datetime) -> bool:
        """Connected at ``at``, so it acts on a desired state within minutes."""
        if self.last_seen is None or self.last_seen <= at or at < self.enrolled_at:
            return False
        return not (self.gap is not None and self.gap[0] <= at < self.gap[1])

    def event(
        self,
        at: datetime,
        kind: EventKind,
        message: str,
        data: dict[str, Any] | None = None,
        severity: Severity = Severity.INFO,
    ) -> None:
        self.events.append((at, kind, severity, message, data or {}))

    def desired_version(self) -> int:
        return self.base_version + len(self.issued) - 1

    def issue(self, at: datetime, *, gemma: str | None = None, minilm: str | None = None) -> int:
        """Store a new desired state changing one model; the version it got."""
        last = self.issued[-1]
        self.issued.append(_Issued(at, gemma or last.gemma, minilm or last.minilm))
        return self.desired_version()


@dataclass
class _Member:
    device: _Device
    rank: str
    state: str = "pending"
    stage: int | None = None
    variant: str | None = None
    placement: str | None = None
    target: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    failure: str | None = None
    detail: str = ""
    desired_version: int | None = None
    since: datetime | None = None
    issued_at: datetime | None = None


@dataclass
class _Rollout:
    id: str
    spec: dict[str, Any]
    created_at: datetime
    created_by: str
    status: str = "active"
    stage: int = 0
    phase: str = "rolling"
    stage_started_at: datetime | None = None
    soak_started_at: datetime | None = None
    next_check_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str = ""
    members: list[_Member] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return str(self.spec["change"]["model"])

    @property
    def version(self) -> str:
        return str(self.spec["change"]["version"])

    def record(
        self, at: datetime, action: str, reason: str, actor: str = ENGINE, **data: Any
    ) -> None:
        self.audit.append(
            {
                "at": at,
                "actor": actor,
                "action": f"rollout.{action}",
                "subject": f"rollout:{self.id}",
                "reason": reason[:2000],
                "data": data,
                "source": ADMIN_SOURCE if actor != ENGINE else "",
            }
        )

    def row(self) -> dict[str, Any]:
        updated = self.updated_at or self.created_at
        return {
            "id": self.id,
            "name": self.spec["name"],
            "change_key": f"model:{self.model}",
            "spec": self.spec,
            "status": self.status,
            "stage": self.stage,
            "phase": self.phase,
            "stage_started_at": self.stage_started_at or self.created_at,
            "soak_started_at": self.soak_started_at,
            "next_check_at": self.next_check_at,
            "gate_failures": [0] * len(self.spec["gates"]),
            # The engine writes the row at every step (every 2 s) while it is live.
            "revision": 1 + int((updated - self.created_at).total_seconds() // 2),
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": updated,
            "finished_at": self.finished_at,
        }


class _Fleet:
    """The seeded fleet in memory, except its telemetry (generated while it is written)."""

    def __init__(self, config: SeedConfig) -> None:
        self.config = config
        self.now = config.moment()
        self.start = self.now - timedelta(days=config.days)
        self.rng = random.Random(f"{config.seed}:fleet")  # noqa: S311 (simulated values)
        self.artifacts = _artifacts(config.seed, self.now)
        self.by_key = {(a.name, a.version, a.variant): a for a in self.artifacts}
        self.groups = self._groups()
        self.tokens = {name: f"tok-{_hex(self.rng, 12)}" for name, *_ in self.groups}
        devices = [self._device(i) for i in range(config.devices)]
        self.devices = sorted(devices, key=lambda d: (d.enrolled_at, d.id))
        self.rollouts: dict[str, _Rollout] = {}
        self.yanked: dict[tuple[str, str], tuple[datetime, str]] = {}
        self._completed()
        self._aborted()
        self._active()
        for device in self.devices:
            self._life_events(device)

    # -- groups and devices ---------------------------------------------------------

    def _groups(self) -> list[tuple[str, str, int, float]]:
        """(name, zone, UTC offset, weight): about one group per 250 devices."""
        count = max(2, min(len(_SITES) * len(_ROLES), self.config.devices // 250))
        picked = []
        for i in range(count):
            site, zone, offset = _SITES[i % len(_SITES)]
            role = _ROLES[(i // len(_SITES)) % len(_ROLES)]
            weight = 1.0 / (1 + i) ** 0.6  # a few big sites, a long tail of small ones
            picked.append((f"{role}-{site}", zone, offset, weight))
        return picked

    def _device(self, index: int) -> _Device:
        seed = self.config.seed
        rng = random.Random(f"{seed}:{index}:device")  # noqa: S311 (simulated values)
        group, zone, offset, _ = rng.choices(self.groups, weights=[g[3] for g in self.groups])[0]
        kind = rng.choice(_KINDS)
        tags = {kind, rng.choice(_LINKS)} | {t for t, share in _EXTRA_TAGS if rng.random() < share}
        hardware = HARDWARE[rng.choices(list(_HARDWARE_MIX), list(_HARDWARE_MIX.values()))[0]]
        agent = rng.choices(list(_AGENT_VERSIONS), list(_AGENT_VERSIONS.values()))[0]
        now = self.now
        if rng.random() < 0.12:  # new this week
            enrolled = now - _seconds(rng, 3600, min(7.0, self.config.days) * 86400)
        else:
            enrolled = now - timedelta(days=8 + _uniform(rng, 0, 300))
        enrolled = enrolled.replace(microsecond=0)
        standing, last_seen, revoked = self._standing(rng, enrolled)
        gap = None
        if standing in ("online", "offline") and last_seen is not None and rng.random() < 0.1:
            begin = max(enrolled, self.start) + HOUR
            if last_seen - begin > 14 * HOUR:
                g0 = begin + (last_seen - begin - 13 * HOUR) * rng.random()
                gap = (g0, g0 + _seconds(rng, 3600, 12 * 3600))
        degraded = None
        if standing == "online" and rng.random() < 0.03:
            degraded = now - _seconds(rng, 120, 3 * 3600)
        return _Device(
            index=index,
            id=f"dev-{rng.getrandbits(64):016x}",
            name=f"{group.split('-', 1)[1]}-{kind}-{index:05d}",
            group=group,
            zone=zone,
            utc_offset_h=offset,
            tags=sorted(tags),
            hardware=hardware,
            profile=hardware.profile(index, seed=seed),
            agent_version=agent,
            enrolled_at=enrolled,
            standing=standing,
            last_seen=last_seen,
            revoked_at=revoked,
            gap=gap,
            degraded_since=degraded,
            base_version=1 + rng.randrange(3),
            dropped=rng.randrange(1, 400) if gap is not None and rng.random() < 0.5 else 0,
        )

    def _standing(
        self, rng: random.Random, enrolled: datetime
    ) -> tuple[str, datetime | None, datetime | None]:
        now, u = self.now, rng.random()
        if u < 0.01:
            return "never", None, None
        if u < 0.015:
            revoked = enrolled + (now - HOUR - enrolled) * _uniform(rng, 0.5, 1.0)
            return "revoked", revoked - _seconds(rng, 60, 3600), revoked
        if u < 0.115:
            if rng.random() < 0.6 or enrolled > now - 8 * DAY:
                seen = enrolled + (now - 10 * MINUTE - enrolled) * _uniform(rng, 0.3, 1.0)
            else:
                seen = max(now - timedelta(days=_uniform(rng, 7.5, 30)), enrolled + HOUR)
            return "offline", seen, None
        return "online", now - _seconds(rng, 0, 45), None

    # -- rollouts -------------------------------------------------------------------

    def _entry(self, device: _Device, model: str, version: str) -> DesiredModel:
        return self.by_key[(model, version, device.variant(model))].desired()

    def _update_events(
        self, device: _Device, at: datetime, model: str, version: str, outcome: str
    ) -> datetime:
        """The agent's events for one update (``healthy``, ``rolled_back``, ``downloading``)."""
        artifact = self.by_key[(model, version, device.variant(model))]
        data = {
            "model": model, "version": version, "target": artifact.path, "sha256": artifact.sha256,
        }  # fmt: skip
        rng = random.Random(f"{device.id}:{at.isoformat()}:{model}")  # noqa: S311
        t = at + _seconds(rng, 2, 20)
        for percent in (50, 100):
            t += _seconds(rng, 10, 90)
            done = artifact.size_bytes * percent // 100
            device.event(
                t,
                EventKind.UPDATE_PROGRESS,
                f"{model} {version}: {percent}% downloaded",
                {**data, "bytes": done, "total": artifact.size_bytes},
            )
            if outcome == "downloading":
                return t
        t += _seconds(rng, 1, 5)
        device.event(
            t, EventKind.UPDATE_VERIFIED, f"{model} {version}: downloaded and verified", data
        )
        t += _seconds(rng, 2, 10)
        device.event(
            t, EventKind.UPDATE_INSTALLED, f"{model} {version}: installed, activated", data
        )
        t += _seconds(rng, 10, 60)
        if outcome == "healthy":
            device.event(t, EventKind.UPDATE_HEALTHY, f"{model} {version}: healthy, serving", data)
            device.event(t, EventKind.MODEL_READY, f"{model} {version} ready", {"model": model})
        else:
            device.event(
                t,
                EventKind.UPDATE_ROLLED_BACK,
                f"{model} {version}: health check failed, rolled back: {_GOLDEN_FAILURE}",
                {**data, "reason": _GOLDEN_FAILURE},
                Severity.ERROR,
            )
        return t

    def _rollout(self, created: datetime, created_by: str, spec: dict[str, Any]) -> _Rollout:
        return _Rollout(f"ro-{_hex(self.rng, 10)}", spec, created, created_by)

    def _enlist(self, rollout: _Rollout, devices: Sequence[_Device]) -> list[_Member]:
        """Every targeted device as a member, in release order; the eligible ones."""
        rollout.members = sorted(
            (_Member(d, device_rank(rollout.id, d.id)) for d in devices), key=lambda m: m.rank
        )
        eligible = []
        for member in rollout.members:
            device = member.device
            if rollout.model == GEMMA and device.low_ram:
                member.state = "ineligible"
                member.detail = (
                    "no variant fits this device: Q8_0: runs only on a GPU, the device has "
                    "none; Q4_K_M: needs 2.2 GiB of RAM with headroom, the device has "
                    f"{device.hardware.ram_bytes / 2**30:.1f} GiB"
                )
                continue
            member.variant = device.variant(rollout.model)
            member.placement = "gpu" if member.variant == "Q8_0" else "cpu"
            member.detail = (
                f"{member.variant}: the best variant that fits, on the {member.placement.upper()}"
            )
            member.target = self._entry(device, rollout.model, rollout.version).model_dump(
                mode="json"
            )
            eligible.append(member)
        return eligible

    def _open(self, rollout: _Rollout, eligible: int) -> None:
        """The rollout is created: its audit entry, every member pending since then."""
        for member in rollout.members:
            member.since = max(rollout.created_at, member.device.enrolled_at)
        ineligible = len(rollout.members) - eligible
        rollout.record(
            rollout.created_at,
            "created",
            f"{rollout.model} {rollout.version} to {eligible} device(s) ({ineligible} ineligible)",
            actor=rollout.created_by,
            spec=rollout.spec,
        )

    def _issue(self, rollout: _Rollout, member: _Member, stage: int, at: datetime) -> None:
        """The engine gives the member the change: a new desired state, state ``updating``."""
        device = member.device
        served = device.served_gemma if rollout.model == GEMMA else device.served_minilm
        member.stage, member.issued_at = stage, at
        member.previous = self._entry(device, rollout.model, served).model_dump(mode="json")
        changed = {"gemma" if rollout.model == GEMMA else "minilm": rollout.version}
        member.desired_version = device.issue(at, **changed)
        member.state, member.since = "updating", at
        member.detail = f"its desired state names {rollout.model} {rollout.version}"

    def _finish(
        self, rollout: _Rollout, member: _Member, timeout_s: float, *, fail: bool = False
    ) -> datetime:
        """An issued member reaches its final state; when it did."""
        device = member.device
        assert member.issued_at is not None
        issued = member.issued_at
        if not device.reachable(issued):
            ended = issued + timedelta(seconds=timeout_s)
            member.state, member.failure, member.since = TIMED_OUT, TIMED_OUT, ended
            member.detail = f"no healthy report of the new version within {timeout_s:g} s"
            rollout.record(
                ended, "device_failed", member.detail, device=device.id, failure=TIMED_OUT
            )
            return ended
        outcome = "rolled_back" if fail else "healthy"
        ended = self._update_events(device, issued, rollout.model, rollout.version, outcome)
        device.acted_on, device.changed_at = len(device.issued) - 1, ended
        member.since = ended
        if fail:
            member.state, member.failure = "failed", HEALTH_CHECK_FAILED
            member.detail = f"update_rolled_back: {_GOLDEN_FAILURE}"
            rollout.record(
                ended, "device_failed", member.detail, device=device.id, failure=HEALTH_CHECK_FAILED
            )
            return ended
        member.state = "updated"
        member.detail = "serves the new version and passed its health check"
        if rollout.model == GEMMA:
            device.served_gemma = rollout.version
        else:
            device.served_minilm = rollout.version
        return ended

    def _downloading(self, rollout: _Rollout, member: _Member) -> None:
        """An issued member still updating now: online ones are downloading."""
        device = member.device
        assert member.issued_at is not None
        if device.reachable(member.issued_at):
            self._update_events(
                device, member.issued_at, rollout.model, rollout.version, "downloading"
            )
            device.acted_on = len(device.issued) - 1

    def _gate_checks(
        self, rollout: _Rollout, stage: int, first: datetime, checks: int, devices: int
    ) -> None:
        """Passing gate checks every ``check_interval_s``, with evidence as ``check_gate`` gives."""
        rng = random.Random(f"{rollout.id}:{stage}:checks")  # noqa: S311
        every = timedelta(seconds=rollout.spec["check_interval_s"])
        typical = {"p95_latency_ms": 1800.0, "error_rate": 0.0021, "golden_failure_rate": 0.004}
        for k in range(checks):
            for index, gate in enumerate(rollout.spec["gates"]):
                metric = gate["metric"]
                ref = typical.get(metric, 1.0) * _uniform(rng, 0.9, 1.1)
                value = ref * _uniform(rng, 0.93, 1.06)
                samples = devices * (k + 1) * 2
                evidence: dict[str, Any] = {
                    "metric": metric,
                    "window_s": gate["window_s"],
                    "min_samples": gate["min_samples"],
                    "updated": {"value": value, "samples": samples, "devices": devices},
                    "baseline": {"value": ref, "samples": samples},
                    "control": {
                        "value": ref * 1.01,
                        "samples": 9 * samples,
                        "devices": 9 * devices,
                    },
                    "thresholds": {
                        key: gate[key]
                        for key in (
                            "max_increase_percent",
                            "max_decrease_percent",
                            "max_value",
                            "min_value",
                        )
                    },
                }
                verdict, decision, reasons = "pass", "pass", []
                if k == 0 and metric == "golden_failure_rate":  # no health checks yet
                    evidence["updated"] = {"value": None, "samples": 0, "devices": devices}
                    reasons = [f"0 sample(s) of the updated devices, {gate['min_samples']} needed"]
                    verdict, decision = "insufficient", "wait"
                else:
                    changes = {}
                    if gate["max_increase_percent"] is not None:
                        for name, reference in (("baseline", ref), ("control", ref * 1.01)):
                            changes[name] = round((value - reference) * 100 / reference, 3)
                    evidence["change_percent"] = changes
                evidence["verdict"] = verdict
                rollout.checks.append(
                    {
                        "rollout_id": rollout.id, "stage": stage, "gate": index,
                        "at": first + every * k, "verdict": verdict, "decision": decision,
                        "reasons": reasons, "evidence": evidence,
                    }
                )  # fmt: skip

    def _completed(self) -> None:
        """gemma3-270m 1.1 to every group six days ago: canary, 25%, 100%; completed."""
        created = self.now - 6 * DAY
        spec = rollout_spec(
            "gemma 1.1 everywhere", GEMMA, "1.1",
            target={"groups": [g[0] for g in self.groups]},
            canary={"count": 10}, percents=[25, 100],
            gates=[
                {"metric": "error_rate", "window_s": 900, "max_value": 0.02},
                {"metric": "p95_latency_ms", "window_s": 900, "max_increase_percent": 25},
            ],
            abort_rules=[{"failure": "any", "threshold_percent": 30, "min_devices": 10}],
            soak_s=1800, check_interval_s=300, device_timeout_s=3600,
        )  # fmt: skip
        rollout = self._rollout(created, "alice", spec)
        self.rollouts["completed"] = rollout
        for device in self.devices:  # what every device ran before: what it was set up with
            # renewed every 20 days or so (fleet.desired's RENEW_BEFORE), never expired
            renewed = self.now - timedelta(days=2 + int(device.id[-4:], 16) % 17)
            device.issued.append(_Issued(max(device.enrolled_at + MINUTE, renewed), "1.0", "1.0"))
        targeted = [
            d
            for d in self.devices
            if d.enrolled_at < created and (d.revoked_at is None or d.revoked_at > created)
        ]
        eligible = self._enlist(rollout, targeted)
        self._open(rollout, len(eligible))
        quotas = stage_quotas(10, [25, 100], len(eligible))
        t, released = created + MINUTE, 0
        for stage, quota in enumerate(quotas):
            if stage:
                rollout.record(
                    t, "stage_started", f"stage {stage - 1} passed its gates; stage {stage} starts",
                    stage=stage,
                )  # fmt: skip
            ends = t
            for member in eligible[released:quota]:
                self._issue(
                    rollout, member, stage, t + timedelta(seconds=int(member.rank[:4], 16) % 600)
                )
                ends = max(ends, self._finish(rollout, member, 3600))
            released = quota
            rollout.record(
                ends, "stage_installed",
                f"stage {stage}: every released device finished; soaking 1800 s", stage=stage,
            )  # fmt: skip
            self._gate_checks(rollout, stage, ends, 7, quota)
            t = ends + 30 * MINUTE
        rollout.stage, rollout.phase, rollout.stage_started_at = (
            len(quotas) - 1,
            "soaking",
            t - HOUR,
        )
        rollout.soak_started_at, rollout.next_check_at = t - 30 * MINUTE, t + 5 * MINUTE
        rollout.status, rollout.finished_at, rollout.updated_at = "completed", t, t
        rollout.record(t, "completed", "every stage passed; the last was 100%")
        # Devices enrolled since got what the rollout left behind, 1.1, from their group's state.
        for device in self.devices:
            if device.enrolled_at >= created and not device.low_ram:
                device.issued = [_Issued(device.enrolled_at + MINUTE, "1.1", "1.0")]
                device.served_gemma = "1.1"

    def _aborted(self) -> None:
        """minilm-l6 2.0 to the pilot devices three days ago: aborted by failed health checks."""
        created = self.now - 3 * DAY
        spec = rollout_spec(
            "minilm 2.0 pilot", MINILM, "2.0",
            target={"tags": ["pilot"]}, canary={"percent": 10}, percents=[100],
            gates=[{"metric": "golden_failure_rate", "window_s": 1800, "max_value": 0.01}],
            abort_rules=[{"failure": HEALTH_CHECK_FAILED, "threshold_count": 3}],
            soak_s=3600, check_interval_s=300,
        )  # fmt: skip
        rollout = self._rollout(created, "bob", spec)
        self.rollouts["aborted"] = rollout
        targeted = [
            d
            for d in self.devices
            if "pilot" in d.tags
            and d.enrolled_at < created
            and (d.revoked_at is None or d.revoked_at > created)
        ]
        eligible = self._enlist(rollout, targeted)
        self._open(rollout, len(eligible))
        canary = eligible[: stage_quotas(None, [10, 100], len(eligible))[0]] if eligible else []
        failures = finished = 0
        ended = created + MINUTE
        for member in canary:
            self._issue(rollout, member, 0, created + MINUTE)
            if not member.device.reachable(created + MINUTE):
                continue  # still updating when the rollout was aborted, long before its timeout
            fail = failures < 3
            ended = max(ended, self._finish(rollout, member, 3600, fail=fail))
            failures += int(fail)
            finished += 1
        aborted = ended + MINUTE
        if failures >= 3:
            reason = (
                f"abort rule: 3 device(s) {HEALTH_CHECK_FAILED}, threshold 3 ({finished} finished)"
            )
            actor = ENGINE
        else:  # too few reachable pilot devices for the rule: an admin stopped it
            reason, actor = "aborted by bob: embeddings drift on the pilot devices", "bob"
        restored = []
        for member in canary:
            device = member.device
            member.state, member.since = "rolled_back", aborted
            member.detail = f"rollout aborted: restored {MINILM} 1.0"
            member.desired_version = device.issue(aborted, minilm="1.0")
            if device.reachable(aborted):
                device.changed_at = self._update_events(device, aborted, MINILM, "1.0", "healthy")
                device.acted_on, device.served_minilm = len(device.issued) - 1, "1.0"
            restored.append(device.id)
        rollout.status, rollout.reason = "aborted", reason
        rollout.finished_at = rollout.updated_at = aborted
        rollout.record(
            aborted, "aborted",
            f"{reason}; {len(restored)} device(s) rolled back to their previous model",
            actor=actor, rolled_back=len(restored), devices=restored[:100],
        )  # fmt: skip
        self.yanked[(MINILM, "2.0")] = (aborted + HOUR, f"health checks failed in {rollout.id}")

    def _active(self) -> None:
        """gemma3-270m 1.2 to most groups: its second stage (10%) is rolling, 45 minutes in.

        The canary stage installed (an offline canary timed out after 90 minutes), soaked
        15 minutes through passing gate checks, and the engine advanced. The second stage
        issues a tenth of its devices at a time (``max_concurrent``: 50 of 10,000) in
        waves of 6 minutes: its eighth wave is downloading now (the cap is full), later
        devices are queued, and no issued device times out for 45 minutes, so the
        engine's next steps change nothing until then.
        """
        timeout_s, wave = 5400.0, 6 * MINUTE
        targets = [g[0] for g in self.groups[: max(1, round(len(self.groups) * 0.6))]]
        spec = rollout_spec(
            "gemma 1.2", GEMMA, "1.2",
            target={"groups": targets}, canary={"count": 20}, percents=[10, 50, 100],
            gates=[
                {"metric": "p95_latency_ms", "window_s": 1800, "max_increase_percent": 20},
                {"metric": "error_rate", "window_s": 1800, "max_value": 0.02},
                {"metric": "golden_failure_rate", "window_s": 1800, "max_value": 0.05},
            ],
            abort_rules=[{"failure": "any", "threshold_percent": 25, "min_devices": 20}],
            soak_s=900, check_interval_s=300, max_concurrent=50, device_timeout_s=timeout_s,
        )  # fmt: skip
        rollout = self._rollout(self.now - 150 * MINUTE, "alice", spec)
        self.rollouts["active"] = rollout
        chosen = set(targets)
        eligible = self._enlist(
            rollout, [d for d in self.devices if d.group in chosen and d.revoked_at is None]
        )
        quotas = stage_quotas(20, [10, 50, 100], len(eligible))
        canary, stage1 = eligible[: quotas[0]], eligible[quotas[0] : quotas[1]]
        cap = max(2, min(50, len(stage1) // 10))
        spec["max_concurrent"] = cap
        # The canary lasts until its last device finished: an offline one's timeout.
        stage1_at = self.now - 45 * MINUTE
        created = stage1_at - 22 * MINUTE
        if any(not m.device.reachable(max(created, m.device.enrolled_at) + MINUTE) for m in canary):
            created -= timedelta(seconds=timeout_s)
        rollout.created_at = rollout.stage_started_at = created
        rollout.updated_at = self.now - timedelta(seconds=2)
        self._open(rollout, len(eligible))
        ends = created + MINUTE
        for member in canary:
            self._issue(rollout, member, 0, max(created, member.device.enrolled_at) + MINUTE)
            ends = max(ends, self._finish(rollout, member, timeout_s))
        if not eligible:
            return
        rollout.record(
            ends, "stage_installed",
            "stage 0 (canary): every released device finished; soaking 900 s", stage=0,
        )  # fmt: skip
        self._gate_checks(rollout, 0, ends, 4, len(canary))
        stage1_at = max(stage1_at, ends + 15 * MINUTE)
        rollout.stage, rollout.stage_started_at = 1, stage1_at
        rollout.record(
            stage1_at, "stage_started", "stage 0 (canary) passed its gates; stage 1 (10%) starts",
            stage=1,
        )  # fmt: skip
        current = int((self.now - stage1_at) / wave)  # the wave issued last, still downloading
        online = health_failures = 0
        for member in stage1:
            device = member.device
            number = online // cap  # offline devices take no slot: they go with the next wave
            if device.reachable(self.now - 3 * MINUTE):
                online += 1
            if number > current:
                member.stage, member.state, member.since = 1, "queued", stage1_at
                member.detail = "released in stage 1"
                continue
            issued = min(stage1_at + wave * number, self.now - 3 * MINUTE)
            self._issue(rollout, member, 1, issued)
            if number == current or not device.reachable(issued):
                self._downloading(rollout, member)  # offline ones have 45 minutes left
                continue
            fail = health_failures < 2 and online % 97 == 13
            health_failures += int(fail)
            self._finish(rollout, member, timeout_s, fail=fail)

    # -- what else happened on each device --------------------------------------------

    def _life_events(self, device: _Device) -> None:
        rng = random.Random(f"{self.config.seed}:{device.index}:events")  # noqa: S311
        if device.last_seen is None:
            return
        hello = {"agent_version": device.agent_version}
        first = device.enrolled_at + MINUTE
        device.event(first, EventKind.ONLINE, "connected", hello)
        if device.gap is not None:
            device.event(
                device.gap[0], EventKind.OFFLINE, "connection lost", severity=Severity.WARNING
            )
            device.event(device.gap[1], EventKind.ONLINE, "connected", hello)
        begin = max(first, self.start)
        span = (device.last_seen - begin).total_seconds()
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # agent restarts
            if span > 600:
                device.event(
                    begin + _seconds(rng, 0, span), EventKind.ONLINE, "agent started", hello
                )
        if device.standing in ("offline", "revoked"):
            device.event(
                device.last_seen, EventKind.OFFLINE, "disconnected", severity=Severity.WARNING
            )
        episodes = rng.choice((1, 1, 2, 3)) if rng.random() < 0.08 else 0
        for _ in range(episodes if span > 3600 else 0):
            self._breaker(device, rng, begin + _seconds(rng, 0, span - 1800), close=True)
        if device.degraded_since is not None:
            self._breaker(device, rng, device.degraded_since, close=False)
        if rng.random() < 0.005 and span > 600:
            device.event(
                begin + _seconds(rng, 0, span),
                EventKind.MODEL_FAILED,
                f"{GEMMA}: out of memory while loading",
                {"model": GEMMA, "reason": "out of memory", "kind": "out_of_memory"},
                Severity.ERROR,
            )

    def _breaker(self, device: _Device, rng: random.Random, at: datetime, *, close: bool) -> None:
        kind = _breaker_kind(device, rng)
        opened = {"model": GEMMA, "from": "closed", "to": "open", "kind": kind}
        device.event(at, EventKind.BREAKER_OPENED, _BREAKER_REASONS[kind], opened, Severity.WARNING)
        if close:
            half = at + _seconds(rng, 30, 300)
            probing = {"model": GEMMA, "from": "open", "to": "half_open"}
            device.event(half, EventKind.BREAKER_HALF_OPEN, "probing", probing)
            closed = {"model": GEMMA, "from": "half_open", "to": "closed"}
            device.event(
                half + _seconds(rng, 5, 60), EventKind.BREAKER_CLOSED, "probes passed", closed
            )

    # -- rows -------------------------------------------------------------------------

    def desired_state(self, device: _Device) -> dict[str, Any]:
        last = device.issued[-1]
        state = DesiredState(
            device_id=device.id,
            version=device.desired_version(),
            issued_at=last.at,
            expires=last.at + DESIRED_LIFETIME,
            models=[
                self._entry(device, GEMMA, last.gemma),
                self._entry(device, MINILM, last.minilm),
            ],
        )
        return state.model_dump(mode="json")

    def reported_state(self, device: _Device) -> dict[str, Any] | None:
        if device.last_seen is None:
            return None
        rng = random.Random(f"{self.config.seed}:{device.index}:reported")  # noqa: S311
        gpu = device.hardware.has_gpu
        served = (
            (GEMMA, device.served_gemma, "llama.cpp", "cuda:0" if gpu else "cpu",
             device.profile.model_memory_bytes),
            (MINILM, device.served_minilm, "onnxruntime", "cpu", 90 * MB),
        )  # fmt: skip
        models = [
            ReportedModel(
                name=name,
                version=version,
                sha256=self.by_key[(name, version, device.variant(name))].sha256,
                state=ModelState.READY,
                runtime=runtime,
                device=where,
                memory_bytes=memory,
            )
            for name, version, runtime, where, memory in served
        ]
        degraded = []
        if device.degraded_since is not None:
            kind = _breaker_kind(device, random.Random(f"{device.id}:degraded"))  # noqa: S311
            degraded.append(
                DegradedModel(
                    name=GEMMA,
                    breaker=BreakerState.OPEN,
                    kind=FailureKind(kind),
                    reason=_BREAKER_REASONS[kind],
                    since=device.degraded_since,
                )
            )
        acted = device.issued[device.acted_on]
        missed = device.last_seen < acted.at  # gone before that state was issued
        converged = (acted.gemma, acted.minilm) == (device.served_gemma, device.served_minilm)
        earliest = max(device.enrolled_at + MINUTE, device.changed_at or device.enrolled_at)
        reported_at = max(earliest, device.last_seen - _seconds(rng, 0, 6 * 3600))
        reported_at = min(reported_at, device.last_seen)
        report = device.hardware.report(device.name, device.agent_version).model_copy(
            update={"timezone": device.zone, "probed_at": reported_at - MINUTE}
        )
        state = ReportedState(
            device_id=device.id,
            desired_version=max(1, device.base_version + device.acted_on - int(missed)),
            converged=converged,
            models=models,
            agent_version=device.agent_version,
            device=report,
            degraded=degraded,
            reported_at=reported_at,
        )
        return state.model_dump(mode="json", exclude_none=True)


def _breaker_kind(device: _Device, rng: random.Random) -> str:
    kinds = ["slow", "error", "overloaded"]
    if device.hardware.has_gpu:
        kinds += ["thermal", "gpu_fault"]
    if device.hardware.ram_bytes < 5 * 10**9:
        kinds.append("out_of_memory")
    return rng.choice(kinds)


# --------------------------------------------------------------------------- telemetry


_SPREAD = math.sqrt(12)  # a uniform draw times this, less half of it, has a variance of 1


def _poisson(uniform: Callable[[], float], mean: float) -> int:
    """A Poisson count (Knuth's method); above 30, a normal-ish one with its mean and spread."""
    if mean <= 0:
        return 0
    if mean < 30:  # multiply uniforms until below e^-mean
        limit, k, p = math.exp(-mean), 0, uniform()
        while p > limit:
            k += 1
            p *= uniform()
        return k
    return max(0, round(mean + math.sqrt(mean) * _SPREAD * (uniform() - 0.5)))


def _k_range(low: float, high: float, step: float) -> tuple[int, int]:
    """The grid indices ``k`` with ``low <= k * step < high``."""
    return max(0, math.ceil(low / step)), max(0, math.ceil(high / step))


class _Telemetry:
    """One device's samples on the fleet's time grid: ``start + phase + k * step``.

    The numbers follow :func:`fleet.simulate.telemetry.next_sample`'s model (a load that
    drifts, Poisson arrivals, latency and GPU use that follow the load), made cheaper
    for millions of rows, plus the device's local day; a degraded device's fallbacks
    answer most requests, slower, from the moment its breaker opened.
    """

    def __init__(self, device: _Device, seed: int, start: float, step: float) -> None:
        assert device.last_seen is not None
        self.rng = rng = random.Random(f"{seed}:{device.index}:telemetry")  # noqa: S311
        self.id = device.id
        self.profile = device.profile
        self.offset_h = device.utc_offset_h
        self.step = step
        self.phase = rng.random() * step
        self.begin = max(start, (device.enrolled_at + MINUTE).timestamp())
        self.end = device.last_seen.timestamp()
        self.gap = (device.gap[0].timestamp(), device.gap[1].timestamp()) if device.gap else None
        self.degraded_at = device.degraded_since.timestamp() if device.degraded_since else math.inf
        self.seq = rng.randrange(1_000, 200_000)
        self.level = 0.0
        self.temperature = device.profile.idle_temperature_c
        self.extra = 0
        origin = start + self.phase
        lo, hi = _k_range(self.begin - origin, self.end - origin, step)
        self.count = max(0, hi - lo)
        if self.gap is not None:
            g_lo, g_hi = _k_range(self.gap[0] - origin, self.gap[1] - origin, step)
            self.count -= max(0, min(g_hi, hi) - max(g_lo, lo))

    def covers(self, t: float) -> bool:
        if not self.begin <= t < self.end:
            return False
        return self.gap is None or not self.gap[0] <= t < self.gap[1]

    def sample(self, t: float) -> tuple[Any, ...]:
        # Uniform noise scaled to the spread wanted: gauss() would cost a third of the row.
        u, p, step = self.rng.random, self.profile, self.step
        hour = int((t / 3600.0 + self.offset_h) % 24)
        self.level = 0.85 * self.level + 0.25 * _SPREAD * (u() - 0.5)
        requests = _poisson(u, p.base_rate_rps * _DIURNAL[hour] * math.exp(self.level) * step)
        utilization = requests * p.latency_ms / 1000.0 / (p.slots * step)
        busy = min(utilization, 0.98)
        queue = 0
        if utilization > 0.6:
            queue = min(p.queue_limit, _poisson(u, busy * busy / (1 - busy)))
        rejections = 0
        if utilization > 1.0:
            rejections = min(requests, _poisson(u, requests * (1 - 1 / utilization)))
        served = requests - rejections
        errors = min(served, _poisson(u, served * 0.002))
        degraded = t >= self.degraded_at
        p50 = p95 = ttft = None
        tokens_per_s = 0.0
        if requests:
            slower = 1.6 if degraded else 1.0
            base = p.latency_ms * (1 + 0.8 * busy * busy) * (0.9 + 0.2 * u()) * slower
            p50 = round(base, 1)
            p95 = round(base * (1.3 + (0.5 + busy) * u()), 1)
            ttft = round(p.ttft_ms * (1 + 2 * busy * busy) * (0.85 + 0.3 * u()) * slower, 1)
            produced = served * (40 + 50 * u()) / step
            tokens_per_s = math.floor(min(produced, p.slots * p.tokens_per_s * 1.2) * 100) / 100
        model_memory = p.model_memory_bytes + int(busy * p.slots * 8 * MB)
        self.extra = min(max(0, self.extra + int(2 * MB * _SPREAD * (u() - 0.5))), 200 * MB)
        fallbacks = min(served, _poisson(u, served * (0.6 if degraded else 0.001)))
        tiers = None
        if fallbacks:
            tiers = (
                {"cache": fallbacks // 3, "model": fallbacks - fallbacks // 3}
                if degraded
                else {"model": fallbacks}
            )
        gpu_util = gpu_memory = temperature = power = None
        if p.gpu_memory_total_bytes is not None:
            gpu_util = round(min(100.0, busy * 100 * (0.85 + 0.15 * u())), 1)
            target = p.idle_temperature_c + 35.0 * gpu_util / 100
            self.temperature += 0.3 * (target - self.temperature) + 0.4 * _SPREAD * (u() - 0.5)
            temperature = round(self.temperature, 1)
            watts = p.idle_power_w + (p.max_power_w - p.idle_power_w) * gpu_util / 100
            power = round(watts * (0.95 + 0.1 * u()), 2)
            gpu_memory = min(p.gpu_memory_total_bytes, model_memory + 180 * MB)
        self.seq += 1
        sent = t + 0.05 + 1.5 * u()
        return (
            self.id, f"{self.rng.getrandbits(128):032x}", self.seq, datetime.fromtimestamp(t, UTC),
            step, requests, errors, rejections, p50, p95, ttft, tokens_per_s, queue, model_memory,
            model_memory + 140 * MB + self.extra, gpu_util, gpu_memory, temperature, power,
            fallbacks, tiers, datetime.fromtimestamp(sent, UTC),
            datetime.fromtimestamp(sent + 0.01 + 0.3 * u(), UTC),
        )  # fmt: skip


def _telemetry(fleet: _Fleet) -> tuple[int, Iterator[tuple[Any, ...]]]:
    """How many samples, and the samples in time order across the fleet."""
    step = fleet.config.interval_min * 60.0
    start = fleet.start.timestamp()
    devices = [_Telemetry(d, fleet.config.seed, start, step) for d in fleet.devices if d.last_seen]
    devices.sort(key=lambda d: (d.phase, d.id))
    slots = math.ceil((fleet.now.timestamp() - start) / step) + 1

    def rows() -> Iterator[tuple[Any, ...]]:
        for k in range(slots):
            base = start + k * step
            for device in devices:
                t = base + device.phase
                if device.covers(t):
                    yield device.sample(t)

    return sum(d.count for d in devices), rows()


# --------------------------------------------------------------------------- rows


def _password_hash(rng: random.Random) -> str:
    """Mosquitto's ``$7$`` PBKDF2-SHA512 form of a password nobody knows (as enrollment)."""
    salt = rng.randbytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", rng.randbytes(24), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _device_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = []
    for device in fleet.devices:
        rng = random.Random(f"{fleet.config.seed}:{device.index}:keys")  # noqa: S311
        report = device.hardware.report(device.name, device.agent_version).model_copy(
            update={"timezone": device.zone, "probed_at": device.enrolled_at - MINUTE}
        )
        reported = fleet.reported_state(device)
        rows.append(
            {
                "id": device.id,
                "name": device.name,
                "group": device.group,
                "public_key": base64.b64encode(rng.randbytes(32)).decode(),
                "token_id": fleet.tokens[device.group],
                "mqtt_password_hash": _password_hash(rng),
                "agent_version": device.agent_version,
                "device_report": report.model_dump(mode="json"),
                "enrolled_at": device.enrolled_at,
                "revoked_at": device.revoked_at,
                "online": device.standing == "online",
                "last_seen": device.last_seen,
                "desired_version": device.desired_version(),
                "desired": fleet.desired_state(device),
                "reported": reported,
                "reported_at": (
                    datetime.fromisoformat(reported["reported_at"]) if reported else None
                ),
                "telemetry_dropped": device.dropped,
            }
        )
    return rows


def _user_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    """The people of the audit trail, with argon2id hashes as the dashboard makes them."""
    hasher = PasswordHasher()
    rng = random.Random(f"{fleet.config.seed}:users")  # noqa: S311 (a fixed salt: same rows)
    rows = []
    for name, role in USERS.items():
        encoded = hash_secret(
            SEED_PASSWORD.encode(),
            rng.randbytes(hasher.salt_len),
            time_cost=hasher.time_cost,
            memory_cost=hasher.memory_cost,
            parallelism=hasher.parallelism,
            hash_len=hasher.hash_len,
            type=hasher.type,
        ).decode()
        created = fleet.now - 400 * DAY
        rows.append(
            {
                "name": name, "role": role, "password_hash": encoded, "disabled": False,
                "created_by": "admin", "created_at": created, "password_changed_at": created,
            }
        )  # fmt: skip
    return rows


def _group_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    first: dict[str, datetime] = {}
    for device in fleet.devices:
        first.setdefault(device.group, device.enrolled_at)
    rows = []
    for name, zone, _, _ in fleet.groups:
        role, site = name.split("-", 1)
        created = first.get(name, fleet.now - 400 * DAY) - DAY
        rows.append(
            {
                "name": name,
                "description": f"{role} devices at {site} ({zone})",
                "created_at": created,
            }
        )
    return rows


def _token_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    used: dict[str, int] = {}
    for device in fleet.devices:
        used[device.group] = used.get(device.group, 0) + 1
    rows = []
    for name, *_ in fleet.groups:
        token = fleet.tokens[name]
        total = max(100, 2 * used.get(name, 0))
        rows.append(
            {
                "id": token,
                "secret_sha256": hashlib.sha256(
                    f"{fleet.config.seed}/{token}".encode()
                ).hexdigest(),
                "group": name,
                "uses_total": total,
                "uses_left": total - used.get(name, 0),
                "created_at": fleet.now - 400 * DAY,
                "expires_at": None,
                "revoked_at": None,
                "note": f"provisioning {name}",
            }
        )
    return rows


def _artifact_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = []
    for a in fleet.artifacts:
        yanked, why = fleet.yanked.get((a.name, a.version), (None, ""))
        rows.append(
            {
                "name": a.name, "version": a.version, "variant": a.variant, "format": a.format,
                "sha256": a.sha256, "size_bytes": a.size_bytes, "metadata": a.meta,
                "created_at": a.created_at, "yanked_at": yanked, "yank_reason": why,
            }
        )  # fmt: skip
    return rows


def _member_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    return [
        {
            "rollout_id": rollout.id,
            "device_id": m.device.id,
            "rank": m.rank,
            "stage": m.stage,
            "state": m.state,
            "variant": m.variant,
            "placement": m.placement,
            "target": m.target,
            "previous": m.previous,
            "failure": m.failure,
            "detail": m.detail[:2000],
            "desired_version": m.desired_version,
            "since": m.since or rollout.created_at,
            "issued_at": m.issued_at,
        }
        for rollout in fleet.rollouts.values()
        for m in rollout.members
    ]


def _audit_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = [entry for rollout in fleet.rollouts.values() for entry in rollout.audit]
    for device in fleet.devices:
        if device.revoked_at is not None:
            rows.append(
                {
                    "at": device.revoked_at, "actor": "alice", "action": "device.revoke",
                    "subject": f"device:{device.id}", "reason": "", "data": {},
                    "source": ADMIN_SOURCE,
                }
            )  # fmt: skip
    rows.sort(key=lambda r: (r["at"], r["subject"], r["action"]))
    return rows


def _event_rows(fleet: _Fleet) -> list[tuple[Any, ...]]:
    rng = random.Random(f"{fleet.config.seed}:event-ids")  # noqa: S311
    found = [(min(e[0], fleet.now), d.id, e) for d in fleet.devices for e in d.events]
    found.sort(key=lambda x: (x[0], x[1], x[2][1].value))
    return [
        (
            device_id,
            f"{rng.getrandbits(128):032x}",
            at,
            kind.value,
            severity.value,
            message,
            data,
            at + timedelta(seconds=0.05 + rng.random()),
        )
        for at, device_id, (_, kind, severity, message, data) in found
    ]


EVENT_COLUMNS = ("device_id", "event_id", "ts", "kind", "severity", "message", "data", "stored_at")


# --------------------------------------------------------------------------- seeding


def _write(writer: _Writer, fleet: _Fleet) -> None:
    """Every table, parents first."""
    if "users" in SQLModel.metadata.tables:  # the dashboard serves no page until an admin exists
        writer.dicts("users", _user_rows(fleet))
    writer.dicts("groups", _group_rows(fleet))
    writer.dicts("enrollment_tokens", _token_rows(fleet))
    writer.dicts("model_artifacts", _artifact_rows(fleet))
    writer.dicts("devices", _device_rows(fleet))
    tags = [(d.id, tag) for d in fleet.devices for tag in d.tags]
    writer.tuples("device_tags", ("device_id", "tag"), tags, len(tags))
    writer.dicts("rollouts", [r.row() for r in fleet.rollouts.values()])
    writer.dicts("rollout_devices", _member_rows(fleet))
    checks = sorted((c for r in fleet.rollouts.values() for c in r.checks), key=lambda c: c["at"])
    writer.dicts("rollout_gate_checks", checks)
    writer.dicts("audit_log", _audit_rows(fleet))
    events = _event_rows(fleet)
    writer.tuples("events", EVENT_COLUMNS, events, len(events))
    total, samples = _telemetry(fleet)
    writer.tuples("telemetry", TELEMETRY_COLUMNS, samples, total)


def seed(engine: sa.Engine, config: SeedConfig, out: TextIO | None = sys.stderr) -> SeedResult:
    """Migrate the (empty) database and fill it; progress goes to ``out``.

    ``Conflict`` when it already holds devices: seeded ids would collide with them.
    """
    started = time.monotonic()
    progress = _Progress(out)
    migrate(engine)
    devices = SQLModel.metadata.tables[str(Device.__tablename__)]
    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(devices)).scalar_one()
    if existing:
        raise Conflict(f"the database already holds {existing} devices: seed an empty one")
    progress.note(
        f"planning {config.devices:,} devices, {config.days:g} days of telemetry "
        f"every {config.interval_min:g} min (seed {config.seed})"
    )
    fleet = _Fleet(config)
    with engine.connect() as conn:
        writer = _Writer(conn, config.batch_rows, progress)
        _write(writer, fleet)
        if conn.dialect.name == "postgresql":
            analyzed = time.monotonic()
            with conn.begin():
                conn.exec_driver_sql("ANALYZE")
            writer.seconds["analyze"] = time.monotonic() - analyzed
    seconds = {**writer.seconds, "total": time.monotonic() - started}
    progress.note(f"done: {sum(writer.rows.values()):,} rows in {seconds['total']:.1f} s")
    return SeedResult(
        now=fleet.now,
        rows=writer.rows,
        seconds=seconds,
        rollouts={state: r.id for state, r in fleet.rollouts.items()},
        groups=[g[0] for g in fleet.groups],
        tags=sorted({t for d in fleet.devices for t in d.tags}),
        device_ids=[d.id for d in fleet.devices],
    )


def _moment(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.simulate.seed",
        description="Fill a controller database with a realistic fleet (see the module's doc).",
    )
    parser.add_argument("--database-url", required=True, help="any URL `edgefleet serve` takes")
    parser.add_argument("--devices", type=int, default=SeedConfig.devices)
    parser.add_argument("--days", type=float, default=SeedConfig.days, help="of telemetry")
    parser.add_argument(
        "--interval-min", type=float, default=SeedConfig.interval_min,
        help="minutes between a device's telemetry samples",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=SeedConfig.seed)
    parser.add_argument("--now", type=_moment, default=None, help="ISO time; default: now")
    parser.add_argument("--batch-rows", type=int, default=SeedConfig.batch_rows)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        config = SeedConfig(
            devices=args.devices, days=args.days, interval_min=args.interval_min,
            seed=args.seed, now=args.now, batch_rows=args.batch_rows,
        )  # fmt: skip
        engine = make_engine(args.database_url)
    except (ValueError, FleetError) as exc:
        parser.error(str(exc))
    try:
        result = seed(engine, config, out=None if args.quiet else sys.stderr)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
