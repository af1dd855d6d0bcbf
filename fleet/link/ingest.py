"""What arrives from devices, checked before anything is stored: pure parsing and validation.

Each MQTT message goes through :func:`parse` once: the topic must be a device's
``reported``, ``telemetry`` or ``events`` topic, the payload at most
:data:`~models.wire.MAX_PAYLOAD_BYTES`, valid JSON of that channel's model, naming
the same device as the topic, with every number small enough for its column. The
result is an :class:`Accepted` (the validated message) or a :class:`Rejection` (a
:class:`Reason` and a line saying why); nothing raises, so a hostile or broken peer
can never stop the ingest loop. Whether the device exists and is not revoked is
asked of a :class:`DeviceDirectory`, a cache the ingest router
(:mod:`fleet.link.router`) refreshes from the database.

:func:`telemetry_rows`, :func:`event_row` and :func:`presence_after` turn accepted
messages into table rows; the batch writer (:mod:`fleet.link.writer`) stores them
through :mod:`fleet.link.store`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from models.topics import Channel, DeviceTopic, TopicError
from models.wire import (
    CHANNEL_MESSAGES,
    MAX_PAYLOAD_BYTES,
    Event,
    EventKind,
    ReportedState,
    TelemetryBatch,
    WireError,
    WireModel,
    decode,
)

__all__ = [
    "INGEST_CHANNELS",
    "Accepted",
    "DeviceDirectory",
    "Reason",
    "Rejection",
    "Standing",
    "event_row",
    "parse",
    "presence_after",
    "telemetry_rows",
]

INGEST_CHANNELS = (Channel.REPORTED, Channel.TELEMETRY, Channel.EVENTS)

_INT32_MAX = 2**31 - 1  # the telemetry table's INTEGER columns
_INT64_MAX = 2**63 - 1  # its BIGINT columns
_INT32_FIELDS = ("requests", "errors", "rejections", "queue_depth")
_INT64_FIELDS = (
    "seq",
    "model_memory_bytes",
    "process_memory_bytes",
    "gpu_memory_used_bytes",
    "fallbacks",
)
_SAMPLE_FIELDS = (
    "seq",
    "window_s",
    "requests",
    "errors",
    "rejections",
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "tokens_per_s",
    "queue_depth",
    "model_memory_bytes",
    "process_memory_bytes",
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_temperature_c",
    "gpu_power_w",
    "fallbacks",
)


class Reason(StrEnum):
    """Why a message was dropped; the link counts rejections by these."""

    BAD_TOPIC = "bad_topic"  # not edgefleet/v1/devices/<id>/<reported|telemetry|events>
    OVERSIZED = "oversized"  # over MAX_PAYLOAD_BYTES, not even read
    INVALID = "invalid"  # not valid JSON of the channel's message model
    OUT_OF_RANGE = "out_of_range"  # valid, but a value does not fit its column
    DEVICE_MISMATCH = "device_mismatch"  # payload device_id differs from the topic's
    UNKNOWN_DEVICE = "unknown_device"  # no such device in the database
    REVOKED_DEVICE = "revoked_device"  # the device was revoked
    STORE_FAILED = "store_failed"  # the database refused this message (never retried)
    INTERNAL_ERROR = "internal_error"  # a bug in the controller (logged with a traceback)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message dropped, and why."""

    reason: Reason
    detail: str
    topic: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid message from ``device_id``; ``retained`` copies are state, not a sign of life."""

    device_id: str
    channel: Channel
    message: WireModel
    received_at: datetime  # aware UTC
    retained: bool = False

    @property
    def rows(self) -> int:
        """Rows it becomes (what batch sizes count)."""
        if isinstance(self.message, TelemetryBatch):
            return len(self.message.samples)
        return 1


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _range_problem(message: WireModel) -> str | None:
    if isinstance(message, TelemetryBatch):
        if message.dropped > _INT64_MAX:
            return "dropped is too large"
        for sample in message.samples:
            for name in _INT32_FIELDS:
                if getattr(sample, name) > _INT32_MAX:
                    return f"samples.{name} is too large"
            for name in _INT64_FIELDS:
                value = getattr(sample, name)
                if value is not None and value > _INT64_MAX:
                    return f"samples.{name} is too large"
            for tier, n in sample.fallbacks_by_tier.items():
                if not 0 <= n <= _INT64_MAX:
                    return f"samples.fallbacks_by_tier[{_short(tier, 40)!r}] is out of range"
                if "\x00" in tier:
                    return "samples.fallbacks_by_tier names a tier with a NUL character"
    elif isinstance(message, Event):
        # PostgreSQL text cannot hold NUL characters.
        if "\x00" in message.message:
            return "message holds a NUL character"
    elif isinstance(message, ReportedState) and "\x00" in message.agent_version:
        return "agent_version holds a NUL character"
    return None


def parse(
    topic: str, payload: bytes, *, received_at: datetime, retained: bool = False
) -> Accepted | Rejection:
    """Check one message from a device; never raises."""
    try:
        where = DeviceTopic.parse(topic)
    except TopicError as exc:
        return Rejection(Reason.BAD_TOPIC, str(exc), _short(topic))
    if where.channel not in INGEST_CHANNELS:
        return Rejection(
            Reason.BAD_TOPIC, f"devices do not publish on {where.channel.value}", _short(topic)
        )
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejection(
            Reason.OVERSIZED,
            f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}",
            topic,
        )
    try:
        message = decode(CHANNEL_MESSAGES[where.channel], payload)
    except WireError as exc:
        return Rejection(Reason.INVALID, _short(str(exc), 300), topic)
    device_id: str = getattr(message, "device_id", "")
    if device_id != where.device_id:
        return Rejection(
            Reason.DEVICE_MISMATCH,
            f"payload says device {_short(device_id, 70)!r} on {where.device_id!r}'s topic",
            topic,
        )
    problem = _range_problem(message)
    if problem is not None:
        return Rejection(Reason.OUT_OF_RANGE, problem, topic)
    return Accepted(where.device_id, where.channel, message, received_at, retained)


class Standing(StrEnum):
    """What the device directory knows of a device id (not the API's online/offline status)."""

    ACTIVE = "active"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass
class DeviceDirectory:
    """Which device ids exist and which are revoked: a cache, replaced wholesale on refresh."""

    _revoked: dict[str, bool] = field(default_factory=dict)

    def replace(self, devices: Mapping[str, bool]) -> None:
        """Install a fresh ``device id -> revoked`` map."""
        self._revoked = dict(devices)

    def standing(self, device_id: str) -> Standing:
        revoked = self._revoked.get(device_id)
        if revoked is None:
            return Standing.UNKNOWN
        return Standing.REVOKED if revoked else Standing.ACTIVE

    def __len__(self) -> int:
        return len(self._revoked)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def telemetry_rows(batch: TelemetryBatch, stored_at: datetime) -> Iterable[dict[str, Any]]:
    """One ``telemetry`` row per sample (timestamps in UTC: SQLite stores them naive).

    ``fallbacks`` stays NULL when the agent did not count them (an agent older than
    degraded mode), which the ``fallback_rate`` gate reads as "no data", never as 0.
    """
    sent_at = _utc(batch.sent_at)
    for sample in batch.samples:
        row: dict[str, Any] = {name: getattr(sample, name) for name in _SAMPLE_FIELDS}
        # An empty breakdown is stored as NULL, like every field a sample did not measure.
        row["fallbacks_by_tier"] = dict(sample.fallbacks_by_tier) or None
        row["device_id"] = batch.device_id
        row["sample_id"] = sample.id
        row["ts"] = _utc(sample.ts)
        row["sent_at"] = sent_at
        row["stored_at"] = stored_at
        yield row


def event_row(event: Event, stored_at: datetime) -> dict[str, Any]:
    return {
        "device_id": event.device_id,
        "event_id": event.id,
        "ts": _utc(event.ts),
        "kind": event.kind.value,
        "severity": event.severity.value,
        "message": event.message,
        "data": event.data,
        "stored_at": stored_at,
    }


def presence_after(item: Accepted) -> bool | None:
    """The device's online flag after ``item``; None when it says nothing (a retained copy)."""
    if item.retained:
        return None
    return not (isinstance(item.message, Event) and item.message.kind is EventKind.OFFLINE)
