"""Telemetry and events: per-device time series, raw samples, events, fleet-wide summary.

Aggregation runs in the database (one GROUP BY over an indexed range), never by
loading samples into Python, so a month of 10-second samples costs one query. Every
range and limit is bounded so no request can ask for unbounded work.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Label, func
from sqlmodel import Session, col, select

from fleet.api.buckets import epoch_bucket
from fleet.api.deps import SessionDep, StateDep, authorize
from fleet.api.present import device_counts, device_or_404, utc
from fleet.api.schemas import DeviceCounts
from fleet.errors import InvalidInput
from fleet.tables import EventRow, TelemetryRow

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["telemetry"], dependencies=[authorize()])

MAX_BUCKETS = 10_000
MAX_RAW = 10_000
DEFAULT_RANGE = timedelta(hours=1)


class Aggregates(BaseModel):
    """Aggregates over a set of samples; ``None`` where no sample measured the value."""

    samples: int
    requests: int
    errors: int
    rejections: int
    latency_p50_ms_avg: float | None
    latency_p95_ms_avg: float | None
    latency_p95_ms_max: float | None
    ttft_p50_ms_avg: float | None
    tokens_per_s_avg: float | None
    queue_depth_max: int | None
    memory_bytes_avg: float | None  # process memory
    memory_bytes_max: int | None
    model_memory_bytes_max: int | None
    gpu_utilization_percent_avg: float | None
    gpu_memory_used_bytes_avg: float | None
    gpu_temperature_c_max: float | None
    gpu_power_w_avg: float | None


class Bucket(Aggregates):
    """The aggregates of one time bucket, ``[start, start + bucket_s)``."""

    start: datetime


class TelemetrySeries(BaseModel):
    """A device's samples in a range, bucketed; only buckets holding samples are listed."""

    device_id: str
    since: datetime
    until: datetime
    bucket_s: int
    buckets: list[Bucket]
    totals: Aggregates


class Sample(BaseModel):
    """One stored telemetry sample."""

    sample_id: str
    seq: int
    ts: datetime
    window_s: float
    requests: int
    errors: int
    rejections: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    tokens_per_s: float | None
    queue_depth: int
    model_memory_bytes: int
    process_memory_bytes: int | None
    gpu_utilization_percent: float | None
    gpu_memory_used_bytes: int | None
    gpu_temperature_c: float | None
    gpu_power_w: float | None


class TelemetrySamples(BaseModel):
    """A device's raw samples in a range, oldest first."""

    device_id: str
    since: datetime
    until: datetime
    samples: list[Sample]
    truncated: bool  # more samples lie in the range than ``limit``


class EventPublic(BaseModel):
    """One stored device event."""

    id: str
    ts: datetime
    kind: str
    severity: str
    message: str
    data: dict[str, Any]


class EventList(BaseModel):
    """A device's events, newest first."""

    device_id: str
    items: list[EventPublic]


class Summary(BaseModel):
    """The fleet now, and what arrived in the last ``window_s`` seconds."""

    devices: DeviceCounts
    window_s: int
    samples: int  # stored with ts in the window
    reporting_devices: int  # devices with at least one sample in the window
    requests: int
    errors: int
    rejections: int
    events: int
    warnings: int  # events of severity warning or error


def _aggregates() -> list[Label[Any]]:
    t = TelemetryRow
    return [
        func.count().label("samples"),
        func.coalesce(func.sum(col(t.requests)), 0).label("requests"),
        func.coalesce(func.sum(col(t.errors)), 0).label("errors"),
        func.coalesce(func.sum(col(t.rejections)), 0).label("rejections"),
        func.avg(col(t.latency_p50_ms)).label("latency_p50_ms_avg"),
        func.avg(col(t.latency_p95_ms)).label("latency_p95_ms_avg"),
        func.max(col(t.latency_p95_ms)).label("latency_p95_ms_max"),
        func.avg(col(t.ttft_p50_ms)).label("ttft_p50_ms_avg"),
        func.avg(col(t.tokens_per_s)).label("tokens_per_s_avg"),
        func.max(col(t.queue_depth)).label("queue_depth_max"),
        func.avg(col(t.process_memory_bytes)).label("memory_bytes_avg"),
        func.max(col(t.process_memory_bytes)).label("memory_bytes_max"),
        func.max(col(t.model_memory_bytes)).label("model_memory_bytes_max"),
        func.avg(col(t.gpu_utilization_percent)).label("gpu_utilization_percent_avg"),
        func.avg(col(t.gpu_memory_used_bytes)).label("gpu_memory_used_bytes_avg"),
        func.max(col(t.gpu_temperature_c)).label("gpu_temperature_c_max"),
        func.avg(col(t.gpu_power_w)).label("gpu_power_w_avg"),
    ]


def _plain(value: Any) -> Any:
    """PostgreSQL answers AVG and big SUMs as Decimal; JSON wants numbers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _row(row: Any) -> dict[str, Any]:
    return {key: _plain(value) for key, value in row._mapping.items()}


def _aware(value: datetime) -> datetime:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


def _range(
    since: datetime | None, until: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """Aware UTC bounds (naive input is taken as UTC); the last hour by default."""
    end = _aware(until) if until else now
    start = _aware(since) if since else end - DEFAULT_RANGE
    if start >= end:
        raise InvalidInput(f"since ({start.isoformat()}) must be before until ({end.isoformat()})")
    return start, end


def _in_range(device_id: str, start: datetime, end: datetime) -> list[ColumnElement[bool]]:
    t = TelemetryRow
    return [col(t.device_id) == device_id, col(t.ts) >= start, col(t.ts) < end]


def _series(
    session: Session, device_id: str, start: datetime, end: datetime, bucket_s: int
) -> TelemetrySeries:
    if math.ceil((end - start).total_seconds() / bucket_s) > MAX_BUCKETS:
        raise InvalidInput(
            f"that range holds more than {MAX_BUCKETS} buckets of {bucket_s} s: "
            "widen bucket_s or narrow the range"
        )
    where = _in_range(device_id, start, end)
    bucket = epoch_bucket(col(TelemetryRow.ts), bucket_s).label("bucket")
    rows = session.exec(
        select(bucket, *_aggregates()).where(*where).group_by(bucket).order_by(bucket)
    ).all()
    totals = session.exec(select(*_aggregates()).where(*where)).one()
    buckets = []
    for row in rows:
        fields = _row(row)
        index = int(fields.pop("bucket"))
        buckets.append(Bucket(start=datetime.fromtimestamp(index * bucket_s, UTC), **fields))
    return TelemetrySeries(
        device_id=device_id,
        since=start,
        until=end,
        bucket_s=bucket_s,
        buckets=buckets,
        totals=Aggregates(**_row(totals)),
    )


def _samples(
    session: Session, device_id: str, start: datetime, end: datetime, limit: int
) -> TelemetrySamples:
    rows = session.exec(
        select(TelemetryRow)
        .where(*_in_range(device_id, start, end))
        .order_by(col(TelemetryRow.ts), col(TelemetryRow.seq))
        .limit(limit + 1)
    ).all()
    samples = [Sample.model_validate({**r.model_dump(), "ts": utc(r.ts)}) for r in rows[:limit]]
    return TelemetrySamples(
        device_id=device_id, since=start, until=end, samples=samples, truncated=len(rows) > limit
    )


@router.get("/devices/{device_id}/telemetry")
def device_telemetry(
    device_id: str,
    session: SessionDep,
    state: StateDep,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket_s: Annotated[int, Query(ge=1, le=86_400)] = 60,
    raw: bool = False,
    limit: Annotated[int, Query(ge=1, le=MAX_RAW)] = 1000,
) -> TelemetrySeries | TelemetrySamples:
    """Samples in ``[since, until)`` (default: the last hour), bucketed, or raw with ``raw``."""
    device_or_404(session, device_id)
    start, end = _range(since, until, state.clock())
    if raw:
        return _samples(session, device_id, start, end, limit)
    return _series(session, device_id, start, end, bucket_s)


@router.get("/devices/{device_id}/events")
def device_events(
    device_id: str,
    session: SessionDep,
    state: StateDep,
    since: datetime | None = None,
    until: datetime | None = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """The device's events in ``[since, until)`` (default: the last hour), newest first."""
    device_or_404(session, device_id)
    start, end = _range(since, until, state.clock())
    e = EventRow
    where = [col(e.device_id) == device_id, col(e.ts) >= start, col(e.ts) < end]
    if kind is not None:
        where.append(col(e.kind) == kind)
    rows = session.exec(
        select(e).where(*where).order_by(col(e.ts).desc(), col(e.id).desc()).limit(limit)
    ).all()
    items = [
        EventPublic(
            id=r.event_id,
            ts=utc(r.ts),
            kind=r.kind,
            severity=r.severity,
            message=r.message,
            data=r.data or {},
        )
        for r in rows
    ]
    return EventList(device_id=device_id, items=items)


@router.get("/telemetry/summary")
def summary(
    session: SessionDep,
    state: StateDep,
    window_s: Annotated[int, Query(ge=1, le=30 * 86_400)] = 900,
) -> Summary:
    """Fleet-wide: device counts now, and what arrived in the last ``window_s`` seconds."""
    start = state.clock() - timedelta(seconds=window_s)
    t = TelemetryRow
    counted = [
        func.count(),
        func.count(func.distinct(col(t.device_id))),
        func.sum(col(t.requests)),
        func.sum(col(t.errors)),
        func.sum(col(t.rejections)),
    ]
    row: Any = session.exec(select(*counted).where(col(t.ts) >= start)).one()
    samples, devices, requests, errors, rejections = (int(_plain(v) or 0) for v in row)
    e = EventRow
    noted = [func.count(), func.count().filter(col(e.severity).in_(["warning", "error"]))]
    noted_row: Any = session.exec(select(*noted).where(col(e.ts) >= start)).one()
    events, warnings = (int(v) for v in noted_row)
    return Summary(
        devices=device_counts(session),
        window_s=window_s,
        samples=samples,
        reporting_devices=devices,
        requests=requests,
        errors=errors,
        rejections=rejections,
        events=events,
        warnings=warnings,
    )
