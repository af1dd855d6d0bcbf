"""Telemetry: every device's samples, in time order across the fleet."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from fleet.simulate.seed.config import _DIURNAL, MINUTE
from fleet.simulate.seed.plan import _Fleet
from fleet.simulate.seed.records import _Device
from fleet.simulate.telemetry import MB

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
