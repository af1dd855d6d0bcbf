"""Telemetry samples: one window of request statistics and device gauges.

:func:`build_sample` is pure (window statistics and gauges in, a wire sample out),
so the window arithmetic is tested without a clock or a model;
:class:`TelemetrySource` is the thin shell that reads the live agent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psutil

from agent.metrics import RequestWindow, WindowStats
from agent.runtime.base import ServedModel
from models.device import GpuSample
from models.wire import TelemetrySample

__all__ = ["Gauges", "TelemetrySource", "build_sample", "percentile"]


@dataclass(frozen=True)
class Gauges:
    """Point-in-time readings at the end of a window."""

    queue_depth: int = 0  # requests waiting for a slot, all models
    model_memory_bytes: int = 0  # weights plus KV cache, all models
    process_memory_bytes: int | None = None  # the agent's RSS
    gpus: Sequence[GpuSample] = field(default_factory=tuple)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def build_sample(
    stats: WindowStats, gauges: Gauges, *, sample_id: str, seq: int, ts: datetime
) -> TelemetrySample:
    """The wire sample for one window.

    GPUs: mean utilisation, summed memory and power, hottest temperature; a field no
    GPU reported stays None.
    """
    utilization = [g.utilization_percent for g in gauges.gpus if g.utilization_percent is not None]
    memory = [g.memory_used_bytes for g in gauges.gpus if g.memory_used_bytes is not None]
    temperature = [g.temperature_c for g in gauges.gpus if g.temperature_c is not None]
    power = [g.power_w for g in gauges.gpus if g.power_w is not None]
    return TelemetrySample(
        id=sample_id,
        seq=seq,
        ts=ts,
        window_s=round(min(max(stats.seconds, 1e-3), 86_400.0), 3),
        requests=stats.requests,
        errors=stats.errors,
        rejections=stats.rejections,
        latency_p50_ms=_ms(percentile(stats.latencies_s, 50)),
        latency_p95_ms=_ms(percentile(stats.latencies_s, 95)),
        ttft_p50_ms=_ms(percentile(stats.ttfts_s, 50)),
        tokens_per_s=round(stats.completion_tokens / max(stats.seconds, 1e-3), 3),
        queue_depth=gauges.queue_depth,
        model_memory_bytes=gauges.model_memory_bytes,
        process_memory_bytes=gauges.process_memory_bytes,
        gpu_utilization_percent=(
            min(sum(utilization) / len(utilization), 100.0) if utilization else None
        ),
        gpu_memory_used_bytes=sum(memory) if memory else None,
        gpu_temperature_c=max(temperature) if temperature else None,
        gpu_power_w=sum(power) if power else None,
        fallbacks=sum(stats.fallbacks.values()),
        fallbacks_by_tier=dict(stats.fallbacks),
    )


class TelemetrySource:
    """Reads one window from the running agent; blocking (a GPU reading may take a while)."""

    def __init__(
        self,
        window: RequestWindow,
        models: Callable[[], list[ServedModel]],
        gpus: Callable[[], list[GpuSample]] | None = None,
    ) -> None:
        self._window = window
        self._models = models
        self._gpus = gpus
        self._process = psutil.Process(os.getpid())

    def read(self) -> tuple[WindowStats, Gauges]:
        stats = self._window.take()
        models = self._models()
        queue = sum(int(getattr(m, "queue_depth", 0) or 0) for m in models)
        try:
            rss: int | None = int(self._process.memory_info().rss)
        except (psutil.Error, OSError):
            rss = None
        gpus = self._gpus() if self._gpus is not None else []
        return stats, Gauges(
            queue_depth=queue,
            model_memory_bytes=sum(m.info.memory_bytes for m in models),
            process_memory_bytes=rss,
            gpus=tuple(gpus),
        )
