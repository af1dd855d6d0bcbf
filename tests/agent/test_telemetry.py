"""Telemetry window arithmetic: exact counts, true percentiles, bounded memory, the sample."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from agent.link.telemetry import Gauges, build_sample, percentile
from agent.metrics import RequestWindow, WindowStats
from models.device import GpuSample
from models.wire import TelemetrySample


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_percentile_interpolates_linearly() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0


def test_the_window_counts_outcomes_and_resets_on_take() -> None:
    clock = Clock()
    window = RequestWindow(clock=clock)
    window.observe(200, 0.100, ttft_s=0.020, completion_tokens=30)
    window.observe(200, 0.300, ttft_s=0.040, completion_tokens=10)
    window.observe(429, 0.001)
    window.observe(503, 0.002)
    window.observe(504, 5.0)
    window.observe(499, 0.5)  # client went away: a request, not an error
    window.observe(200, 0.050)  # an embedding: no first token
    clock.now += 10
    stats = window.take()
    assert (stats.requests, stats.errors, stats.rejections) == (7, 2, 1)
    assert stats.completion_tokens == 40
    assert stats.seconds == 10
    assert sorted(stats.ttfts_s) == [0.020, 0.040]
    clock.now += 5
    empty = window.take()
    assert (empty.requests, empty.seconds, empty.latencies_s) == (0, 5, ())


def test_a_busy_window_keeps_a_bounded_uniform_sample() -> None:
    window = RequestWindow(max_samples=500, rand=random.Random(7).random)
    for n in range(100_000):
        window.observe(200, n / 100_000)
    stats = window.take()
    assert stats.requests == 100_000  # counts stay exact
    assert len(stats.latencies_s) == 500
    p50 = percentile(stats.latencies_s, 50)
    assert p50 is not None
    assert abs(p50 - 0.5) < 0.08


def test_a_sample_from_a_window() -> None:
    stats = WindowStats(
        seconds=10.0,
        requests=4,
        errors=1,
        rejections=1,
        completion_tokens=250,
        latencies_s=(0.1, 0.2, 0.3, 0.4),
        ttfts_s=(0.05, 0.07),
        fallbacks={"cache": 2, "model": 1},
    )
    gauges = Gauges(
        queue_depth=3,
        model_memory_bytes=400 * 2**20,
        process_memory_bytes=900 * 2**20,
        gpus=(
            GpuSample(index=0, utilization_percent=40, memory_used_bytes=2**30, power_w=20),
            GpuSample(index=1, utilization_percent=60, temperature_c=71.5, power_w=30),
        ),
    )
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    sample = build_sample(stats, gauges, sample_id="a" * 32, seq=7, ts=ts)
    assert sample == TelemetrySample(
        id="a" * 32,
        seq=7,
        ts=ts,
        window_s=10.0,
        requests=4,
        errors=1,
        rejections=1,
        latency_p50_ms=250.0,
        latency_p95_ms=385.0,
        ttft_p50_ms=60.0,
        tokens_per_s=25.0,
        queue_depth=3,
        model_memory_bytes=400 * 2**20,
        process_memory_bytes=900 * 2**20,
        gpu_utilization_percent=50.0,
        gpu_memory_used_bytes=2**30,
        gpu_temperature_c=71.5,
        gpu_power_w=50.0,
        fallbacks=3,
        fallbacks_by_tier={"cache": 2, "model": 1},
    )


def test_an_idle_window_without_gpus_leaves_latencies_and_gpu_fields_empty() -> None:
    stats = WindowStats(10.0, 0, 0, 0, 0, (), ())
    sample = build_sample(stats, Gauges(), sample_id="b" * 32, seq=0, ts=datetime.now(UTC))
    assert sample.requests == 0
    assert sample.tokens_per_s == 0.0
    assert sample.latency_p50_ms is None
    assert sample.ttft_p50_ms is None
    assert sample.gpu_utilization_percent is None
    assert sample.gpu_memory_used_bytes is None
