"""Prometheus metrics for one agent process, in a registry of its own (never the global one).

Counters and histograms are updated on the request path; gauges that describe
current state (queue depth, slots in use, model and device memory) are read
when Prometheus scrapes, so they can never go stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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

__all__ = ["AgentMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)

GpuReader = Callable[[], list[Any]]


class _StateCollector(Collector):
    """Gauges computed at scrape time from the live models and the machine."""

    def __init__(self, models: Callable[[], list[ServedModel]], gpus: GpuReader | None) -> None:
        self._models = models
        self._gpus = gpus
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


class AgentMetrics:
    """Everything /metrics exposes; one instance per app."""

    def __init__(
        self, models: Callable[[], list[ServedModel]], gpus: GpuReader | None = None
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
        self.load_seconds = Gauge(
            "edgefleet_model_load_seconds", "Time the last load took", ["model"], registry=r
        )
        r.register(_StateCollector(models, gpus))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
