"""What to seed and what was seeded, with a seeded fleet's fixed vocabulary and draws.

:class:`SeedConfig` in, :class:`SeedResult` out; the sites, kinds, versions and mixes
the plan draws from; and the small random draws every part of the plan shares.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

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
