"""Prometheus metrics for one agent process, in a registry of its own (never the global one).

Counters and histograms are updated on the request path; gauges that describe
current state (queue depth, slots in use, model and device memory) are read
when Prometheus scrapes, so they can never go stale.

Beside them, :class:`RequestWindow` keeps what fleet telemetry needs and Prometheus
cannot give: exact counts and true percentiles over one telemetry window (histograms
only give bucket estimates), in bounded memory.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.runtime.base import ServedModel

__all__ = ["AgentMetrics", "RequestWindow", "WindowStats"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)

GpuReader = Callable[[], list[Any]]
BreakerReader = Callable[[], list[tuple[str, str]]]  # (model, state) of every breaker
_BREAKER_STATES = ("closed", "open", "half_open")


class _StateCollector(Collector):
    """Gauges computed at scrape time from the live models and the machine."""

    def __init__(
        self,
        models: Callable[[], list[ServedModel]],
        gpus: GpuReader | None,
        breakers: BreakerReader | None = None,
    ) -> None:
        self._models = models
        self._gpus = gpus
        self._breakers = breakers
        self._process = psutil.Process(os.getpid())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "edgefleet_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        active = GaugeMetricFamily(
            "edgefleet_active_slots", "Sequences generating now", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "edgefleet_model_memory_bytes",
            "Estimated weights plus KV cache",
            labels=["model", "device"],
        )
        for model in self._models():
            name = model.manifest.name
            memory.add_metric([name, model.info.device], model.info.memory_bytes)
            depth = getattr(model, "queue_depth", None)
            if depth is not None:
                queue.add_metric([name], depth)
                active.add_metric([name], getattr(model, "active", 0))
        yield queue
        yield active
        yield memory
        if self._breakers is not None:
            state = GaugeMetricFamily(
                "edgefleet_breaker_state",
                "Circuit breaker state of a model: 1 for the state it is in",
                labels=["model", "state"],
            )
            for model_name, current in self._breakers():
                for name in _BREAKER_STATES:
                    state.add_metric([model_name, name], 1.0 if name == current else 0.0)
            yield state
        rss = GaugeMetricFamily("edgefleet_process_resident_bytes", "Agent resident memory")
        rss.add_metric([], self._process.memory_info().rss)
        yield rss
        avail = GaugeMetricFamily("edgefleet_host_memory_available_bytes", "Host RAM available")
        avail.add_metric([], psutil.virtual_memory().available)
        yield avail
        if self._gpus is None:
            return
        used = GaugeMetricFamily(
            "edgefleet_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]
        )
        util = GaugeMetricFamily("edgefleet_gpu_utilization_percent", "GPU busy", labels=["gpu"])
        for sample in self._gpus():
            if sample.memory_used_bytes is not None:
                used.add_metric([str(sample.index)], sample.memory_used_bytes)
            if sample.utilization_percent is not None:
                util.add_metric([str(sample.index)], sample.utilization_percent)
        yield used
        yield util


@dataclass(frozen=True)
class WindowStats:
    """What one window of requests looked like; latencies are a uniform sample."""

    seconds: float  # the window's length
    requests: int
    errors: int  # 5xx, timeouts included
    rejections: int  # 429: queue full
    completion_tokens: int  # generated tokens
    latencies_s: tuple[float, ...]  # at most RequestWindow.max_samples, uniformly sampled
    ttfts_s: tuple[float, ...]  # likewise, for requests that generated a first token
    fallbacks: Mapping[str, int] = field(default_factory=dict)  # answers by a fallback tier


class _Reservoir:
    """A uniform random sample of at most ``size`` values from a stream (Algorithm R)."""

    def __init__(self, size: int, rand: Callable[[], float]) -> None:
        self.size = size
        self.rand = rand
        self.seen = 0
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = int(self.rand() * self.seen)
        if slot < self.size:
            self.values[slot] = value


class RequestWindow:
    """Counts and latency samples since the last :meth:`take`; thread-safe, bounded memory."""

    def __init__(
        self,
        max_samples: int = 4096,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.max_samples = max_samples
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._started = now
        self._requests = self._errors = self._rejections = self._tokens = 0
        self._fallbacks: dict[str, int] = {}
        self._latency = _Reservoir(self.max_samples, self._rand)
        self._ttft = _Reservoir(self.max_samples, self._rand)

    def observe(
        self,
        status: int,
        latency_s: float,
        *,
        ttft_s: float | None = None,
        completion_tokens: int = 0,
        fallback_tier: str | None = None,
    ) -> None:
        """One finished request: status, latency, first-token time, answering fallback tier."""
        with self._lock:
            self._requests += 1
            if fallback_tier is not None:
                self._fallbacks[fallback_tier] = self._fallbacks.get(fallback_tier, 0) + 1
            if status >= 500:
                self._errors += 1
            elif status == 429:
                self._rejections += 1
            self._tokens += max(completion_tokens, 0)
            self._latency.add(latency_s)
            if ttft_s is not None:
                self._ttft.add(ttft_s)

    def take(self) -> WindowStats:
        """The window so far; a new one starts now."""
        now = self._clock()
        with self._lock:
            stats = WindowStats(
                seconds=max(now - self._started, 1e-9),
                requests=self._requests,
                errors=self._errors,
                rejections=self._rejections,
                completion_tokens=self._tokens,
                latencies_s=tuple(self._latency.values),
                ttfts_s=tuple(self._ttft.values),
                fallbacks=dict(self._fallbacks),
            )
            self._reset(now)
        return stats


class AgentMetrics:
    """Everything /metrics exposes; one instance per app."""

    def __init__(
        self,
        models: Callable[[], list[ServedModel]],
        gpus: GpuReader | None = None,
        breakers: BreakerReader | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgefleet_requests", "Requests by outcome", ["model", "endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "edgefleet_request_duration_seconds",
            "Request latency, receipt to last byte",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edgefleet_time_to_first_token_seconds",
            "Receipt to first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "edgefleet_decode_tokens_per_second",
            "Per-request decode speed",
            ["model"],
            buckets=_TPS_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("edgefleet_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.rejections = Counter(
            "edgefleet_rejections",
            "Requests refused before running",
            ["model", "reason"],
            registry=r,
        )
        self.cache = Counter(
            "edgefleet_response_cache", "Response cache lookups", ["model", "result"], registry=r
        )
        self.fallbacks = Counter(
            "edgefleet_fallbacks",
            "Requests answered by a fallback tier, by the model asked for",
            ["model", "tier"],
            registry=r,
        )
        self.failover = Histogram(
            "edgefleet_failover_seconds",
            "A model failing in a request to the next tier's first text",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.breaker_transitions = Counter(
            "edgefleet_breaker_transitions",
            "Circuit breaker moves",
            ["model", "to"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "edgefleet_model_load_seconds", "Time the last load took", ["model"], registry=r
        )
        r.register(_StateCollector(models, gpus, breakers))
        self.window = RequestWindow()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
