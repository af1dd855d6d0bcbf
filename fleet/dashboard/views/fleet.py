"""The whole fleet at a glance: devices by status, the models it runs, its telemetry.

Every number is one SQL aggregate, never device rows loaded into Python, so the
overview costs about the same at 10 devices and 10,000. What a device runs lives in
its last report, a JSON document; :func:`fleet_models` and :func:`runs_model` read it
inside the database (SQLite's ``json_each``, PostgreSQL's ``json_array_elements``).
Charts cover a bounded window in fixed buckets (:func:`bucket_window`), and the pure
:func:`chart` turns bucket rows into the spec ``static/app.js`` draws, with a gap
(``None``) where no sample fell.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Label, func
from sqlmodel import Session, col, select

from fleet.api.buckets import epoch_bucket
from fleet.degraded import is_degraded
from fleet.rollout.plan import LIVE, DeviceState
from fleet.tables import Device, Rollout, RolloutDevice, TelemetryRow

__all__ = [
    "DEVICE_STATUSES",
    "BucketWindow",
    "ChartLine",
    "FleetModel",
    "SettledBuckets",
    "StatusCounts",
    "bucket_window",
    "chart",
    "degraded_now",
    "fleet_charts",
    "fleet_models",
    "has_points",
    "in_live_rollout",
    "number",
    "reading",
    "runs_model",
    "status_counts",
]

DEVICE_STATUSES = ("online", "offline", "updating", "degraded", "ineligible", "revoked")
"""The statuses the overview counts and the device list filters by."""

_LIVE = [s.value for s in LIVE]


@dataclass(frozen=True)
class StatusCounts:
    """Devices by status; a device may count twice (online and degraded, say)."""

    enrolled: int  # not revoked
    online: int
    offline: int
    updating: int  # a live rollout issued its update, not yet confirmed healthy
    degraded: int  # its last report lists a model answered by its fallbacks
    ineligible: int  # a live rollout found no variant it can run
    revoked: int


@dataclass(frozen=True)
class FleetModel:
    """How many (non-revoked) devices report running one version of a model."""

    name: str
    version: str | None  # None: the device did not say
    devices: int


def number(value: Any) -> float | None:
    """A database aggregate as a plain float (PostgreSQL answers Decimal), or None."""
    if value is None:
        return None
    return float(value) if isinstance(value, Decimal | int | float) else None


def in_live_rollout(state: DeviceState) -> sa.ColumnElement[bool]:
    """SQL on ``devices``: some active or paused rollout holds the device in ``state``."""
    return sa.exists().where(
        col(RolloutDevice.device_id) == col(Device.id),
        col(RolloutDevice.state) == state.value,
        col(RolloutDevice.rollout_id).in_(
            select(col(Rollout.id)).where(col(Rollout.status).in_(_LIVE))
        ),
    )


def status_counts(session: Session) -> StatusCounts:
    """Two aggregate queries: one over devices, one over live rollouts' members."""
    live = col(Device.revoked_at).is_(None)
    row = session.exec(
        select(
            func.count().filter(live),
            func.count().filter(live, col(Device.online) == True),  # noqa: E712
            func.count().filter(~live),
            func.count().filter(live, degraded_now()),
        ).select_from(Device)
    ).one()
    enrolled, online, revoked, degraded = (int(x) for x in row)
    member = col(RolloutDevice.device_id)
    in_rollout = session.exec(
        select(
            func.count(sa.distinct(member)).filter(
                col(RolloutDevice.state) == DeviceState.UPDATING.value
            ),
            func.count(sa.distinct(member)).filter(
                col(RolloutDevice.state) == DeviceState.INELIGIBLE.value
            ),
        )
        .select_from(RolloutDevice)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(col(Rollout.status).in_(_LIVE))
    ).one()
    updating, ineligible = (int(x) for x in in_rollout)
    return StatusCounts(
        enrolled=enrolled,
        online=online,
        offline=enrolled - online,
        updating=updating,
        degraded=degraded,
        ineligible=ineligible,
        revoked=revoked,
    )


# --- what the fleet runs, read from the reported JSON in the database ------------------
#
# Parsing every report is the cost here (PostgreSQL's ``json`` type is text, parsed again
# by each operator), so a filter first asks a cheap question of the report's text (does it
# name the model at all?) and parses only the reports that pass; CASE fixes that order.
# A report lists each model once (the agent serves one version of a name), so counting
# rows counts devices, without a DISTINCT's sort. Reports are stored from a validated
# ReportedState (fleet.link.store), so ``models`` is always an array when present.

_MODELS_SQLITE = """
SELECT json_extract(m.value, '$.name') AS name, json_extract(m.value, '$.version') AS version,
       count(*) AS devices
FROM devices AS d, json_each(d.reported, '$.models') AS m
WHERE d.revoked_at IS NULL {name}
GROUP BY 1, 2
"""
_MODELS_POSTGRES = """
SELECT m ->> 'name' AS name, m ->> 'version' AS version, count(*) AS devices
FROM devices AS d CROSS JOIN LATERAL json_array_elements(d.reported -> 'models') AS m
WHERE d.revoked_at IS NULL {name}
GROUP BY 1, 2
"""
_NAMED = "CAST(d.reported AS TEXT) LIKE :like ESCAPE '\\' AND {field} = :name"
_RUNS_SQLITE = """CASE WHEN CAST(devices.reported AS TEXT) LIKE :run_like ESCAPE '\\'
THEN EXISTS (SELECT 1 FROM json_each(devices.reported, '$.models') AS rm
WHERE json_extract(rm.value, '$.name') = :run_name {version}) ELSE 0 END"""
_RUNS_POSTGRES = """CASE WHEN CAST(devices.reported AS TEXT) LIKE :run_like ESCAPE '\\'
THEN EXISTS (SELECT 1 FROM json_array_elements(devices.reported -> 'models') AS rm
WHERE rm ->> 'name' = :run_name {version}) ELSE false END"""


def _quoted_like(name: str) -> str:
    """A LIKE pattern for the JSON string ``"name"`` anywhere in a report's text."""
    escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f'%"{escaped}"%'


def _sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def fleet_models(session: Session, name: str | None = None) -> list[FleetModel]:
    """Each (model, version) the non-revoked devices report, by name, most devices first."""
    sqlite = _sqlite(session)
    template = _MODELS_SQLITE if sqlite else _MODELS_POSTGRES
    if name is None:
        query = sa.text(template.format(name=""))
    else:
        field = "json_extract(m.value, '$.name')" if sqlite else "m ->> 'name'"
        named = "AND " + _NAMED.format(field=field)
        query = sa.text(template.format(name=named)).bindparams(name=name, like=_quoted_like(name))
    rows = session.connection().execute(query).all()
    found = [FleetModel(str(r[0]), None if r[1] is None else str(r[1]), int(r[2])) for r in rows]
    return sorted(found, key=lambda m: (m.name, -m.devices, m.version or ""))


def runs_model(name: str, version: str | None, *, sqlite: bool) -> sa.TextClause:
    """SQL on ``devices``: its last report lists model ``name`` (at ``version``, if given)."""
    if sqlite:
        check = "AND json_extract(rm.value, '$.version') = :run_version"
        clause = sa.text(_RUNS_SQLITE.format(version=check if version is not None else ""))
    else:
        check = "AND rm ->> 'version' = :run_version"
        clause = sa.text(_RUNS_POSTGRES.format(version=check if version is not None else ""))
    clause = clause.bindparams(run_name=name, run_like=_quoted_like(name))
    if version is not None:
        return clause.bindparams(run_version=version)
    return clause


def degraded_now() -> sa.ColumnElement[bool]:
    """SQL on ``devices``: :func:`fleet.degraded.is_degraded`, parsing fewer reports.

    Only the reports whose text mentions a breaker are parsed: only a degraded model's
    entry has that key.
    """
    mentions = sa.cast(col(Device.reported), sa.Text).like('%"breaker"%')
    return sa.case((mentions, is_degraded()), else_=sa.false())


# --- charts -------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketWindow:
    """``count`` buckets of ``bucket_s`` seconds, the last one holding ``now``."""

    first: int  # index of the first bucket: its start is first * bucket_s (unix seconds)
    count: int
    bucket_s: int

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.first * self.bucket_s, UTC)

    @property
    def x(self) -> list[int]:
        """Each bucket's start, unix seconds: the charts' x axis."""
        return [(self.first + i) * self.bucket_s for i in range(self.count)]


def bucket_window(now: datetime, hours: int, bucket_s: int) -> BucketWindow:
    """The last ``hours`` in whole buckets (the last bucket, holding now, partly filled)."""
    count = max(1, math.ceil(hours * 3600 / bucket_s))
    last = math.floor(now.timestamp() / bucket_s)
    return BucketWindow(first=last - count + 1, count=count, bucket_s=bucket_s)


@dataclass(frozen=True)
class ChartLine:
    """One line of a chart: its label and how to read its value from a bucket row."""

    label: str
    value: Callable[[Mapping[str, Any]], float | None]


def chart(
    title: str,
    window: BucketWindow,
    rows: Mapping[int, Mapping[str, Any]],
    lines: Sequence[ChartLine],
    height: int = 160,
) -> dict[str, Any]:
    """The spec ``static/app.js`` draws; buckets without samples are gaps, not zeros."""

    def at(i: int, line: ChartLine) -> float | None:
        row = rows.get(window.first + i)
        value = None if row is None else line.value(row)
        return None if value is None else round(value, 3)

    return {
        "title": title,
        "x": window.x,
        "series": [
            {"label": line.label, "values": [at(i, line) for i in range(window.count)]}
            for line in lines
        ],
        "height": height,
    }


def has_points(charts: Sequence[Mapping[str, Any]]) -> bool:
    """Some chart holds a value: there was telemetry in the window."""
    return any(v is not None for c in charts for s in c["series"] for v in s["values"])


def reading(name: str, scale: float = 1.0) -> Callable[[Mapping[str, Any]], float | None]:
    """Read one aggregate of a bucket row, scaled (bytes to GiB, say)."""

    def read(row: Mapping[str, Any]) -> float | None:
        value = number(row.get(name))
        return None if value is None else value * scale

    return read


def _error_rate(row: Mapping[str, Any]) -> float | None:
    requests = number(row.get("requests")) or 0.0
    errors = number(row.get("errors")) or 0.0
    return None if requests <= 0 else 100.0 * errors / requests


class SettledBuckets:
    """Fleet chart buckets that no longer change, kept by one app: a chart reads the rest.

    A bucket is *settled* ``settle_s`` after it ends; by then what devices spooled while
    offline has mostly arrived. Settled buckets are all read again once the copy is
    ``ttl_s`` old, so a later straggler shows within that. Without this, every overview
    would aggregate a whole day of the fleet's samples; with it, only the last hour or so.
    Page requests run in worker threads, so the copy is swapped under a lock.
    """

    def __init__(self, settle_s: float = 3600.0, ttl_s: float = 900.0) -> None:
        self.settle_s = settle_s
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._copy: tuple[int, datetime, int, dict[int, dict[str, Any]]] | None = None

    def settled_until(self, now: datetime, bucket_s: int) -> int:
        """The first bucket index that is not settled yet."""
        return math.floor((now.timestamp() - self.settle_s) / bucket_s)

    def get(self, now: datetime, bucket_s: int) -> tuple[int, dict[int, dict[str, Any]]] | None:
        """``(until, rows)``: buckets below ``until`` as read then; None when stale or absent."""
        with self._lock:
            copy = self._copy
        if copy is None:
            return None
        width, taken, until, rows = copy
        if width != bucket_s or (now - taken).total_seconds() > self.ttl_s or now < taken:
            return None
        return until, rows

    def put(
        self, now: datetime, bucket_s: int, until: int, rows: Mapping[int, Mapping[str, Any]]
    ) -> None:
        kept = {i: dict(r) for i, r in rows.items() if i < until}
        with self._lock:
            self._copy = (bucket_s, now, until, kept)


def _bucket_rows(
    session: Session, start: datetime, now: datetime, bucket_s: int
) -> dict[int, dict[str, Any]]:
    t = TelemetryRow
    bucket = epoch_bucket(col(t.ts), bucket_s).label("bucket")
    columns: list[Label[Any]] = [
        func.avg(col(t.latency_p50_ms)).label("p50"),
        func.avg(col(t.latency_p95_ms)).label("p95"),
        func.max(col(t.latency_p95_ms)).label("p95_max"),
        func.sum(col(t.requests)).label("requests"),
        func.sum(col(t.errors)).label("errors"),
        func.sum(col(t.tokens_per_s) * col(t.window_s)).label("tokens"),
    ]
    query = select(bucket, *columns).where(col(t.ts) >= start, col(t.ts) <= now).group_by(bucket)
    found: list[Any] = list(session.exec(query).all())
    return {int(r.bucket): dict(r._mapping) for r in found}


def fleet_charts(
    session: Session,
    now: datetime,
    hours: int = 24,
    bucket_s: int = 900,
    settled: SettledBuckets | None = None,
) -> list[dict[str, Any]]:
    """Fleet-wide latency, error rate, requests and generated tokens/s, in one GROUP BY.

    It reads the buckets ``settled`` does not hold (all of them without it).
    """
    window = bucket_window(now, hours, bucket_s)
    copy = settled.get(now, bucket_s) if settled is not None else None
    rows: dict[int, dict[str, Any]] = {}
    first = window.first
    if copy is not None:
        until, kept = copy
        rows = {i: r for i, r in kept.items() if i >= window.first}
        first = max(first, until)
    rows.update(_bucket_rows(session, datetime.fromtimestamp(first * bucket_s, UTC), now, bucket_s))
    if settled is not None and copy is None:
        settled.put(now, bucket_s, settled.settled_until(now, bucket_s), rows)
    per_s = 1.0 / bucket_s
    return [
        chart(
            "Latency (ms, mean of devices)",
            window,
            rows,
            [
                ChartLine("p50", reading("p50")),
                ChartLine("p95", reading("p95")),
                ChartLine("worst p95", reading("p95_max")),
            ],
        ),
        chart(
            "Errors (% of requests)",
            window,
            rows,
            [ChartLine("error rate %", _error_rate)],
        ),
        chart(
            "Throughput",
            window,
            rows,
            [
                ChartLine("requests/s", reading("requests", per_s)),
                ChartLine("tokens/s", reading("tokens", per_s)),
            ],
        ),
    ]
