"""The device list and one device in detail: the queries and shaping behind /ui/devices.

The list is one page of a filtered, sorted query: a COUNT and a SELECT with LIMIT and
OFFSET, both in the database, so it stays fast at 10,000 devices; only the page's rows
(50 by default) are parsed into Python. Its state is the URL's query string, parsed
by the pure :func:`parse_listing`, so any filtered view is a link to share.

A device's detail compares what it should run with what it reports, model by model
(:func:`state_rows`, pure), and reads its telemetry in time buckets over a bounded
window (at most a week), never the raw samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy import Label, func
from sqlmodel import Session, col, select

from fleet.api.buckets import epoch_bucket
from fleet.api.present import device_public, reported_of, tags_of
from fleet.api.schemas import DevicePublic
from fleet.dashboard.views.fleet import (
    DEVICE_STATUSES,
    ChartLine,
    bucket_window,
    chart,
    degraded_now,
    in_live_rollout,
    reading,
    runs_model,
)
from fleet.errors import InvalidInput
from fleet.rollout.plan import DeviceState
from fleet.state import Drift
from fleet.tables import Device, DeviceTag, EventRow, Group, ModelArtifact, TelemetryRow, as_utc
from models.device import DeviceReport
from models.policy import policy_digest
from models.values import MODEL_NAME, VERSION
from models.wire import DesiredState, ReportedState

__all__ = [
    "MAX_HOURS",
    "PER_PAGE",
    "SORTS",
    "Capability",
    "DevicePage",
    "DeviceRow",
    "EventPage",
    "FilterOptions",
    "Listing",
    "PolicyState",
    "StateRow",
    "UpdateNote",
    "bucket_for",
    "capabilities",
    "device_charts",
    "device_report_of",
    "events_page",
    "filter_options",
    "last_updates",
    "list_devices",
    "parse_hours",
    "parse_listing",
    "policy_state",
    "reported_variants",
    "state_rows",
]

SORTS = ("name", "last_seen", "group", "agent", "status")
PER_PAGE = (25, 50, 100, 200)
MAX_HOURS = 168  # a week: the longest telemetry window a device page shows
EVENTS_PER_PAGE = 25
_MAX_TEXT = 128  # search text and filter values


@dataclass(frozen=True)
class Listing:
    """What the device list shows: filters, sort and page, as in the URL."""

    q: str = ""  # part of the name or id
    group: str = ""
    tag: str = ""
    status: str = ""  # one of DEVICE_STATUSES, or "" for all
    model: str = ""  # "name" (any version) or "name@version"
    sort: str = "name"
    order: str = "asc"
    page: int = 1
    per_page: int = 50

    @property
    def model_name(self) -> str | None:
        return self.model.partition("@")[0] or None

    @property
    def model_version(self) -> str | None:
        return self.model.partition("@")[2] or None

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.group or self.tag or self.status or self.model)

    def url(self, **changes: Any) -> str:
        """The URL of this listing changed by ``changes``; defaults are left out (shorter)."""
        listing = replace(self, **changes)
        default = Listing()
        params = {
            key: value for key, value in vars(listing).items() if value != getattr(default, key)
        }
        return "/ui/devices" + (f"?{urlencode(params)}" if params else "")

    def sorted_by(self, key: str) -> str:
        """The URL that sorts by ``key``: the other way round if it already does."""
        order = "desc" if self.sort == key and self.order == "asc" else "asc"
        return self.url(sort=key, order=order, page=1)


def _text(raw: Mapping[str, str], key: str) -> str:
    value = raw.get(key, "").strip()
    if len(value) > _MAX_TEXT:
        raise InvalidInput(f"{key} is longer than {_MAX_TEXT} characters", field=key)
    return value


def _positive(raw: Mapping[str, str], key: str, default: int) -> int:
    text = raw.get(key, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"{key} must be a whole number from 1, not {text[:20]!r}", field=key)
    return int(text)


def parse_listing(raw: Mapping[str, str]) -> Listing:
    """The listing a query string asks for; ``InvalidInput`` naming the bad parameter."""
    status = _text(raw, "status")
    if status and status not in DEVICE_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(DEVICE_STATUSES)}", field="status")
    model = _text(raw, "model")
    if model:
        name, _, version = model.partition("@")
        if not MODEL_NAME.match(name) or (version and not VERSION.match(version)):
            raise InvalidInput("model must be a model name, or name@version", field="model")
    sort = _text(raw, "sort") or "name"
    if sort not in SORTS:
        raise InvalidInput(f"sort must be one of {', '.join(SORTS)}", field="sort")
    order = _text(raw, "order") or "asc"
    if order not in ("asc", "desc"):
        raise InvalidInput("order must be asc or desc", field="order")
    per_page = _positive(raw, "per_page", 50)
    if per_page not in PER_PAGE:
        raise InvalidInput(
            f"per_page must be one of {', '.join(map(str, PER_PAGE))}", field="per_page"
        )
    return Listing(
        q=_text(raw, "q"),
        group=_text(raw, "group"),
        tag=_text(raw, "tag"),
        status=status,
        model=model,
        sort=sort,
        order=order,
        page=_positive(raw, "page", 1),
        per_page=per_page,
    )


@dataclass(frozen=True)
class DeviceRow:
    """One device in the list, with what its last report says it runs."""

    device: DevicePublic
    models: list[str]  # "gemma3 2.0"


@dataclass(frozen=True)
class DevicePage:
    """One page of the list, and where it sits among the matching devices."""

    listing: Listing
    total: int  # devices matching the filters
    rows: list[DeviceRow]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.listing.per_page))

    @property
    def first(self) -> int:
        """The position of the page's first row, from 1 (0 when empty)."""
        return (self.listing.page - 1) * self.listing.per_page + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return self.first + len(self.rows) - 1 if self.rows else 0


def _filters(listing: Listing, sqlite: bool) -> list[sa.ColumnElement[bool] | sa.TextClause]:
    d = Device
    live = col(d.revoked_at).is_(None)
    where: list[sa.ColumnElement[bool] | sa.TextClause] = []
    if listing.q:
        where.append(
            col(d.name).icontains(listing.q, autoescape=True)
            | col(d.id).icontains(listing.q, autoescape=True)
        )
    if listing.group:
        where.append(col(d.group) == listing.group)
    if listing.tag:
        where.append(
            sa.exists().where(
                col(DeviceTag.device_id) == col(d.id), col(DeviceTag.tag) == listing.tag
            )
        )
    match listing.status:
        case "online":
            where += [live, col(d.online) == True]  # noqa: E712
        case "offline":
            where += [live, col(d.online) == False]  # noqa: E712
        case "revoked":
            where.append(~live)
        case "degraded":
            where += [live, degraded_now()]
        case "updating":
            where.append(in_live_rollout(DeviceState.UPDATING))
        case "ineligible":
            where.append(in_live_rollout(DeviceState.INELIGIBLE))
    if listing.model_name:
        where.append(runs_model(listing.model_name, listing.model_version, sqlite=sqlite))
    return where


def _order(listing: Listing) -> list[Any]:
    d = Device
    status = sa.case(
        (col(d.revoked_at).is_not(None), 2),
        (col(d.online) == True, 0),  # noqa: E712
        else_=1,
    )
    key: Any = {
        "name": func.lower(col(d.name)),  # people sort names without regard to case
        "last_seen": col(d.last_seen),
        "group": col(d.group),
        "agent": col(d.agent_version),
        "status": status,
    }[listing.sort]
    ordered = key.desc() if listing.order == "desc" else key.asc()
    return [ordered.nulls_last(), col(d.id).desc() if listing.order == "desc" else col(d.id)]


def _running(device: Device) -> list[str]:
    reported = reported_of(device)
    if reported is None:
        return []
    return [f"{m.name} {m.version or '?'}" for m in reported.models]


def _page_ids(session: Session, listing: Listing, where: list[Any]) -> tuple[list[str], int | None]:
    """The page's device ids in order, and the matching total (None when the page is empty).

    One statement filters and sorts ids only (narrow rows sort fast, however deep the
    page) and counts the matches in the same pass (``count(*) OVER ()``).
    """
    found = session.exec(
        select(col(Device.id), func.count().over().label("total"))
        .where(*where)
        .order_by(*_order(listing))
        .limit(listing.per_page)
        .offset((listing.page - 1) * listing.per_page)
    ).all()
    return [row[0] for row in found], int(found[0][1]) if found else None


def list_devices(session: Session, listing: Listing) -> DevicePage:
    """The page the listing asks for (the last page, if it asks past the end)."""
    where = _filters(listing, session.get_bind().dialect.name == "sqlite")
    ids, total = _page_ids(session, listing, where)
    if total is None:  # past the end, or nothing matches
        total = int(session.exec(select(func.count()).select_from(Device).where(*where)).one())
        last = max(1, -(-total // listing.per_page))
        if total and listing.page > last:
            listing = replace(listing, page=last)
            ids, _ = _page_ids(session, listing, where)
        elif listing.page > last:
            listing = replace(listing, page=1)
    loaded = session.exec(select(Device).where(col(Device.id).in_(ids))).all() if ids else []
    by_id = {x.id: x for x in loaded}
    devices = [by_id[i] for i in ids if i in by_id]
    tags = tags_of(session, ids)
    rows = [DeviceRow(device_public(x, tags[x.id]), _running(x)) for x in devices]
    return DevicePage(listing=listing, total=total, rows=rows)


@dataclass(frozen=True)
class FilterOptions:
    """What the filter controls offer: small tables only, each capped."""

    groups: list[str]
    tags: list[str]
    models: list[str]  # "name" and "name@version" from the registry


def filter_options(session: Session, cap: int = 500) -> FilterOptions:
    groups = session.exec(select(col(Group.name)).order_by(col(Group.name)).limit(cap)).all()
    tags = session.exec(
        select(col(DeviceTag.tag)).distinct().order_by(col(DeviceTag.tag)).limit(cap)
    ).all()
    pairs = session.exec(
        select(col(ModelArtifact.name), col(ModelArtifact.version))
        .distinct()
        .order_by(col(ModelArtifact.name), col(ModelArtifact.version))
        .limit(cap)
    ).all()
    models: list[str] = []
    for name, version in pairs:
        if name not in models:
            models.append(name)
        models.append(f"{name}@{version}")
    return FilterOptions(groups=list(groups), tags=list(tags), models=models)


# --- one device: desired against reported ----------------------------------------------


@dataclass(frozen=True)
class UpdateNote:
    """The latest update event for a model on the device: how its A/B slots last moved."""

    kind: str  # update_installed, update_healthy, update_rolled_back, update_failed
    version: str | None
    ts: datetime
    message: str


@dataclass(frozen=True)
class StateRow:
    """One model: what the desired state asks, what the device reports, how they differ."""

    model: str
    desired_version: str | None
    desired_variant: str | None  # from the signed target's path
    desired_sha256: str | None
    reported_version: str | None
    reported_variant: str | None  # the registry's variant with the reported file's sha256
    reported_sha256: str | None
    state: str | None  # loading, ready, failed, missing; None: not reported
    runtime: str | None
    placement: str | None  # "cpu", "cuda:0"
    memory_bytes: int | None
    error: str | None
    drift: list[str]  # what differs, in words; empty: as desired
    update: UpdateNote | None

    @property
    def drifted(self) -> bool:
        return bool(self.drift)


def _variant_of_path(path: str) -> str:
    """``gemma3/2.0/Q4_K_M.gguf`` -> ``Q4_K_M`` (registry target paths, fleet.registry.targets)."""
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def state_rows(
    desired: DesiredState | None,
    reported: ReportedState | None,
    drift: Drift,
    variants: Mapping[str, str],
    updates: Mapping[str, UpdateNote],
) -> list[StateRow]:
    """Every model desired or reported, desired ones first, each with its drift."""
    wanted = {m.name: m for m in desired.models} if desired else {}
    running = {m.name: m for m in reported.models} if reported else {}
    names = list(wanted) + [n for n in running if n not in wanted]
    rows = []
    for name in names:
        want, got = wanted.get(name), running.get(name)
        target = want.target if want else None
        rows.append(
            StateRow(
                model=name,
                desired_version=want.version if want else None,
                desired_variant=_variant_of_path(target.path) if target else None,
                desired_sha256=target.sha256 if target else None,
                reported_version=got.version if got else None,
                reported_variant=variants.get(got.sha256) if got and got.sha256 else None,
                reported_sha256=got.sha256 if got else None,
                state=got.state.value if got else None,
                runtime=got.runtime if got else None,
                placement=got.device if got else None,
                memory_bytes=got.memory_bytes if got else None,
                error=got.error if got else None,
                drift=[i.message for i in drift.items if i.model == name],
                update=updates.get(name),
            )
        )
    return rows


@dataclass(frozen=True)
class PolicyState:
    """The fallback policy the desired state carries against the one the device enforces."""

    desired: str | None  # "edge-default v2"; None: the desired state carries none
    reported: str | None  # None: the device enforces none (or never reported)
    reported_name: str | None
    reported_digest: str | None
    differs: bool


def policy_state(desired: DesiredState | None, reported: ReportedState | None) -> PolicyState:
    body = desired.fallback if desired else {}
    wanted = f"{body.get('name')} v{body.get('version')}" if body else None
    ref = reported.policy if reported else None
    has = f"{ref.name} v{ref.version}" if ref else None
    if body and ref:
        differs = policy_digest(dict(body)) != ref.digest
    else:
        differs = bool(body) != bool(ref) and desired is not None
    return PolicyState(
        desired=wanted,
        reported=has,
        reported_name=ref.name if ref else None,
        reported_digest=ref.digest if ref else None,
        differs=differs,
    )


def reported_variants(session: Session, reported: ReportedState | None) -> dict[str, str]:
    """sha256 -> variant, for the files the device reports (one query, at most 64 hashes)."""
    digests = sorted({m.sha256 for m in reported.models if m.sha256}) if reported else []
    if not digests:
        return {}
    rows = session.exec(
        select(col(ModelArtifact.sha256), col(ModelArtifact.variant)).where(
            col(ModelArtifact.sha256).in_(digests)
        )
    ).all()
    return {sha: variant for sha, variant in rows}


_UPDATE_KINDS = ("update_installed", "update_healthy", "update_rolled_back", "update_failed")


def last_updates(session: Session, device_id: str, scan: int = 200) -> dict[str, UpdateNote]:
    """Each model's latest update event, from the device's last ``scan`` update events."""
    e = EventRow
    rows = session.exec(
        select(e)
        .where(col(e.device_id) == device_id, col(e.kind).in_(_UPDATE_KINDS))
        .order_by(col(e.ts).desc(), col(e.id).desc())
        .limit(scan)
    ).all()
    found: dict[str, UpdateNote] = {}
    for row in rows:
        model = (row.data or {}).get("model")
        if isinstance(model, str) and model not in found:
            version = (row.data or {}).get("version")
            found[model] = UpdateNote(
                kind=row.kind,
                version=None if version is None else str(version),
                ts=as_utc(row.ts) or row.ts,
                message=row.message,
            )
    return found


@dataclass(frozen=True)
class Capability:
    """One line of what the device's hardware and software offer."""

    label: str
    value: str


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def capabilities(raw: Mapping[str, Any] | None) -> list[Capability]:
    """The device report (from enrollment, or its latest state report) as labelled lines."""
    if not raw:
        return []
    try:
        report = DeviceReport.model_validate(raw)
    except ValidationError:
        return [Capability("report", "the device report does not parse (a newer agent?)")]
    cores = f"{report.cpu_physical_cores} physical, {report.cpu_logical_cores} logical"
    lines = [
        Capability("hostname", report.hostname),
        Capability("system", f"{report.os} ({report.arch}, kernel {report.kernel})"),
        Capability("CPU", f"{report.cpu_model or 'unknown model'}; {cores}"),
        Capability(
            "memory",
            f"{_gib(report.ram_total_bytes)} total, {_gib(report.ram_available_bytes)} free",
        ),
    ]
    if report.is_jetson:
        model = report.jetson_model or "unknown model"
        lines.append(Capability("Jetson", f"{model}, L4T {report.l4t_version or '?'}"))
    for gpu in report.gpus:
        facts = [_gib(gpu.memory_total_bytes)]
        if gpu.compute_capability:
            facts.append(f"compute {gpu.compute_capability}")
        if gpu.driver_version:
            facts.append(f"driver {gpu.driver_version}")
        if gpu.cuda_version:
            facts.append(f"CUDA {gpu.cuda_version}")
        lines.append(Capability(f"GPU {gpu.index}", f"{gpu.name}: {', '.join(facts)}"))
    if not report.gpus:
        lines.append(Capability("GPU", "none"))
    runtimes = ", ".join(f"{k} {v}" for k, v in sorted(report.runtimes.items())) or "none found"
    lines.append(Capability("runtimes", runtimes))
    lines.append(Capability("llama.cpp GPU offload", "yes" if report.llama_gpu_offload else "no"))
    if report.timezone:
        lines.append(Capability("time zone", report.timezone))
    return lines


def device_report_of(device: Device, reported: ReportedState | None) -> dict[str, Any]:
    """The freshest hardware report: the last state report's, else enrollment's."""
    if reported is not None and reported.device is not None:
        return reported.device.model_dump(mode="json")
    return dict(device.device_report or {})


# --- events and telemetry ---------------------------------------------------------------


@dataclass(frozen=True)
class EventPage:
    """A page of a device's events, newest first."""

    items: list[EventRow]
    page: int
    more: bool  # older events follow


def events_page(
    session: Session, device_id: str, page: int, per_page: int = EVENTS_PER_PAGE
) -> EventPage:
    e = EventRow
    rows = session.exec(
        select(e)
        .where(col(e.device_id) == device_id)
        .order_by(col(e.ts).desc(), col(e.id).desc())
        .limit(per_page + 1)
        .offset((page - 1) * per_page)
    ).all()
    return EventPage(items=list(rows[:per_page]), page=page, more=len(rows) > per_page)


def parse_hours(text: str | None) -> int:
    """The telemetry window in hours: 1 to ``MAX_HOURS``, 24 when not given."""
    if text is None or not text.strip():
        return 24
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_HOURS:
        raise InvalidInput(f"hours must be a whole number from 1 to {MAX_HOURS}", field="hours")
    return int(text)


_BUCKETS_S = (60, 120, 300, 600, 900, 1800, 3600)


def bucket_for(hours: int, most: int = 300) -> int:
    """The narrowest bucket (seconds) that keeps a window of ``hours`` within ``most`` points."""
    return next((b for b in _BUCKETS_S if hours * 3600 / b <= most), _BUCKETS_S[-1])


def device_charts(
    session: Session, device_id: str, now: datetime, hours: int
) -> list[dict[str, Any]]:
    """Latency, tokens/s, errors, GPU memory and temperature; one GROUP BY on the index."""
    bucket_s = bucket_for(hours)
    window = bucket_window(now, hours, bucket_s)
    t = TelemetryRow
    bucket = epoch_bucket(col(t.ts), bucket_s).label("bucket")
    columns: list[Label[Any]] = [
        func.avg(col(t.latency_p50_ms)).label("p50"),
        func.avg(col(t.latency_p95_ms)).label("p95"),
        func.avg(col(t.tokens_per_s)).label("tokens_per_s"),
        func.sum(col(t.requests)).label("requests"),
        func.sum(col(t.errors)).label("errors"),
        func.sum(col(t.rejections)).label("rejections"),
        func.avg(col(t.gpu_memory_used_bytes)).label("gpu_memory"),
        func.max(col(t.gpu_temperature_c)).label("gpu_temp"),
    ]
    query = (
        select(bucket, *columns)
        .where(col(t.device_id) == device_id, col(t.ts) >= window.start, col(t.ts) <= now)
        .group_by(bucket)
    )
    found: list[Any] = list(session.exec(query).all())
    rows = {int(r.bucket): r._mapping for r in found}
    return [
        chart(
            "Latency (ms)",
            window,
            rows,
            [ChartLine("p50", reading("p50")), ChartLine("p95", reading("p95"))],
        ),
        chart("Tokens/s", window, rows, [ChartLine("tokens/s", reading("tokens_per_s"))]),
        chart(
            "Errors (per bucket)",
            window,
            rows,
            [ChartLine("errors", reading("errors")), ChartLine("rejected", reading("rejections"))],
        ),
        chart(
            "GPU memory (GiB)",
            window,
            rows,
            [ChartLine("used", reading("gpu_memory", 1 / 2**30))],
        ),
        chart("GPU temperature (°C)", window, rows, [ChartLine("max", reading("gpu_temp"))]),
    ]
