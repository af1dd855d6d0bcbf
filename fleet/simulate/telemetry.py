"""What a simulated device reports: hardware profiles and plausible telemetry, purely.

Each device gets a :class:`DeviceProfile` from its index (a Jetson Orin Nano, a
desktop with an RTX card, or a CPU-only box, in proportions set by ``gpu_share``),
and every window :func:`next_sample` draws that window's numbers from the profile,
the previous :class:`LoadState` and a seeded :class:`random.Random`. Load drifts
(a mean-reverting walk), requests arrive as a Poisson process, and latency, time
to first token, queue depth, memory, GPU use, temperature and power follow the
load, so charts of a simulated fleet look like a real one's rather than like noise.

A served model version that a regression rule matches (:mod:`.regress`) changes the
numbers through :class:`~fleet.simulate.regress.Effects`: latency and time to first
token multiplied, tokens/s multiplied, a share of requests failing, a share answered
by a fallback tier (``fallbacks``, drawn from a generator of their own seeded by one
draw of the window's, so a fallback rate moves no other number). The load itself
(requests, utilisation, queue) does not change, so the same device before and after an
update differs by exactly those effects, as a rollout's gate should see it.

Hardware profiles other than these three defaults come from :mod:`.hardware`.

Samples are plain dicts ready for ``json.dumps`` (building pydantic models for 400
messages a second would cost more than sending them); ``tests/fleet`` checks that
each one validates as :class:`models.wire.TelemetrySample`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from fleet.simulate.regress import NO_EFFECTS, Effects
from models.device import DeviceReport, GpuInfo
from models.wire import SCHEMA_VERSION

__all__ = [
    "PROFILE_KINDS",
    "DeviceProfile",
    "LoadState",
    "device_report",
    "next_sample",
    "profile_for",
    "telemetry_payload",
]

GB = 1_000_000_000
MB = 1_000_000
BASE_FALLBACK_RATE = 0.001  # requests a fallback tier answers on a healthy device

ProfileKind = Literal["jetson-orin-nano", "rtx-desktop", "cpu-box"]
PROFILE_KINDS: tuple[ProfileKind, ...] = ("jetson-orin-nano", "rtx-desktop", "cpu-box")


@dataclass(frozen=True)
class DeviceProfile:
    """The fixed traits of one simulated device; rates are for one stream alone."""

    kind: str  # a ProfileKind, or the name of a hardware profile (.hardware)
    base_rate_rps: float  # requests per second at an average moment
    latency_ms: float  # p50 of one request with nothing else running
    ttft_ms: float  # time to first token, alone
    tokens_per_s: float  # decode rate of one stream, alone
    slots: int  # requests served at once (continuous batching)
    queue_limit: int  # waiting requests before 429s
    model_memory_bytes: int  # weights and KV cache of the loaded models
    ram_total_bytes: int
    gpu_memory_total_bytes: int | None  # None: no GPU
    idle_power_w: float  # GPU (or module) power at rest; unused without a GPU
    max_power_w: float
    idle_temperature_c: float

    @property
    def gpu(self) -> bool:
        return self.gpu_memory_total_bytes is not None


@dataclass(frozen=True)
class LoadState:
    """What carries over from one window to the next."""

    level: float = 0.0  # log of the load multiplier; reverts to 0
    temperature_c: float | None = None  # GPU temperature, lags the load
    process_extra_bytes: int = 0  # allocator growth above the baseline


def _unit(seed: int, index: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, index, salt)."""
    return random.Random(f"{seed}:{index}:{salt}").random()  # noqa: S311 (simulated values)


def profile_for(index: int, *, gpu_share: float = 0.3, seed: int = 0) -> DeviceProfile:
    """Device ``index``'s profile: about ``gpu_share`` of devices have a GPU.

    Of those, two thirds are Jetson Orin Nanos and one third desktops with an RTX
    card; the rest are CPU-only boxes. Every trait varies a little per device.
    """
    if not 0.0 <= gpu_share <= 1.0:
        raise ValueError("gpu_share must be between 0 and 1")
    rng = random.Random(f"{seed}:{index}:profile")  # noqa: S311 (simulated values)
    pick = _unit(seed, index, "kind")
    spread = rng.uniform
    rate = math.exp(rng.gauss(math.log(0.4), 0.8))  # req/s: most devices quiet, a few busy
    if pick < gpu_share * 2 / 3:
        return DeviceProfile(
            kind="jetson-orin-nano",
            base_rate_rps=rate,
            latency_ms=spread(900, 1500),
            ttft_ms=spread(70, 140),
            tokens_per_s=spread(45, 65),
            slots=4,
            queue_limit=32,
            model_memory_bytes=int(spread(330, 420) * MB),
            ram_total_bytes=8 * GB - 50 * MB,
            gpu_memory_total_bytes=8 * GB - 50 * MB,  # shared with the CPU
            idle_power_w=spread(3.0, 4.5),
            max_power_w=spread(12.0, 15.0),
            idle_temperature_c=spread(38, 46),
        )
    if pick < gpu_share:
        return DeviceProfile(
            kind="rtx-desktop",
            base_rate_rps=rate * 3,
            latency_ms=spread(220, 450),
            ttft_ms=spread(15, 40),
            tokens_per_s=spread(180, 320),
            slots=8,
            queue_limit=64,
            model_memory_bytes=int(spread(600, 900) * MB),
            ram_total_bytes=int(rng.choice((32, 64)) * GB),
            gpu_memory_total_bytes=int(rng.choice((12, 16, 24)) * GB),
            idle_power_w=spread(12, 25),
            max_power_w=spread(160, 280),
            idle_temperature_c=spread(32, 42),
        )
    return DeviceProfile(
        kind="cpu-box",
        base_rate_rps=rate * 0.6,
        latency_ms=spread(2200, 3800),
        ttft_ms=spread(250, 600),
        tokens_per_s=spread(18, 30),
        slots=2,
        queue_limit=16,
        model_memory_bytes=int(spread(300, 380) * MB),
        ram_total_bytes=int(rng.choice((4, 8, 16)) * GB),
        gpu_memory_total_bytes=None,
        idle_power_w=0.0,
        max_power_w=0.0,
        idle_temperature_c=0.0,
    )


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean < 30:  # Knuth: multiply uniforms until below e^-mean
        limit, k, p = math.exp(-mean), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


def _binomial(rng: random.Random, n: int, p: float) -> int:
    """Successes in ``n`` trials (Poisson approximation, capped at ``n``)."""
    return min(n, _poisson(rng, n * p))


def next_sample(
    profile: DeviceProfile,
    state: LoadState,
    rng: random.Random,
    *,
    sample_id: str,
    seq: int,
    ts: datetime,
    window_s: float,
    effects: Effects = NO_EFFECTS,
) -> tuple[dict[str, Any], LoadState]:
    """One window's sample (a :class:`~models.wire.TelemetrySample`, as a dict), next state.

    ``effects`` are those of the model versions served in the window (a regression).
    """
    level = 0.85 * state.level + rng.gauss(0.0, 0.25)  # mean-reverting, about e^±0.5
    rate = profile.base_rate_rps * math.exp(level)
    requests = _poisson(rng, rate * window_s)
    # Utilisation of the serving slots: requests x service time over slot-seconds.
    utilization = requests * profile.latency_ms / 1000.0 / (profile.slots * window_s)
    busy = min(utilization, 0.98)
    queue_depth = 0
    if utilization > 0.6:
        queue_depth = min(profile.queue_limit, _poisson(rng, busy * busy / (1 - busy)))
    rejections = 0  # 429s, counted among the requests
    if utilization > 1.0:
        rejections = _binomial(rng, requests, 1 - 1 / utilization)
    error_rate = 0.002 if effects.error_rate is None else effects.error_rate
    errors = _binomial(rng, requests - rejections, error_rate)
    sample: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": sample_id,
        "seq": seq,
        "ts": ts.isoformat(),
        "window_s": window_s,
        "requests": requests,
        "errors": errors,
        "rejections": rejections,
        "queue_depth": queue_depth,
    }
    if requests:
        # Slower under contention (batching shares the decoder), with a jittery tail.
        slowdown = 1.0 + 0.8 * busy * busy
        p50 = profile.latency_ms * slowdown * rng.uniform(0.9, 1.1)
        slower = effects.latency
        sample["latency_p50_ms"] = round(p50 * slower, 1)
        sample["latency_p95_ms"] = round(p50 * rng.uniform(1.3, 1.8 + busy) * slower, 1)
        sample["ttft_p50_ms"] = round(
            profile.ttft_ms * (1.0 + 2.0 * busy * busy) * rng.uniform(0.85, 1.15) * slower, 1
        )
        tokens = (requests - rejections) * rng.uniform(40, 90)  # per served request
        ceiling = profile.slots * profile.tokens_per_s * 1.2  # batching beats one stream
        produced = min(tokens / window_s, ceiling) * effects.tps
        sample["tokens_per_s"] = math.floor(produced * 100) / 100
    else:
        sample["tokens_per_s"] = 0.0
    extra = max(0, state.process_extra_bytes + int(rng.gauss(0, 2 * MB)))
    extra = min(extra, 200 * MB)
    kv_bytes = int(busy * profile.slots * 8 * MB)
    sample["model_memory_bytes"] = profile.model_memory_bytes + kv_bytes
    sample["process_memory_bytes"] = profile.model_memory_bytes + kv_bytes + 140 * MB + extra
    fallback_rng = random.Random(rng.random())  # noqa: S311 (simulated values)
    fallback_rate = BASE_FALLBACK_RATE if effects.fallback_rate is None else effects.fallback_rate
    fallbacks = _binomial(fallback_rng, requests - rejections, fallback_rate)
    sample["fallbacks"] = fallbacks
    if fallbacks:
        sample["fallbacks_by_tier"] = {"model": fallbacks}
    temperature = state.temperature_c
    if profile.gpu_memory_total_bytes is not None:
        gpu_util = min(100.0, max(0.0, busy * 100 * rng.uniform(0.85, 1.0)))
        power = profile.idle_power_w + (profile.max_power_w - profile.idle_power_w) * gpu_util / 100
        target = profile.idle_temperature_c + 35.0 * gpu_util / 100
        current = temperature if temperature is not None else profile.idle_temperature_c
        temperature = current + 0.3 * (target - current) + rng.gauss(0, 0.4)
        sample["gpu_utilization_percent"] = round(gpu_util, 1)
        sample["gpu_memory_used_bytes"] = min(
            profile.gpu_memory_total_bytes, sample["model_memory_bytes"] + 180 * MB
        )
        sample["gpu_temperature_c"] = round(temperature, 1)
        sample["gpu_power_w"] = round(power * rng.uniform(0.95, 1.05), 2)
    return sample, replace(state, level=level, temperature_c=temperature, process_extra_bytes=extra)


def telemetry_payload(
    device_id: str, batch_id: str, sent_at: datetime, sample: dict[str, Any]
) -> bytes:
    """The MQTT payload of a one-sample :class:`~models.wire.TelemetryBatch`."""
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "device_id": device_id,
            "id": batch_id,
            "sent_at": sent_at.isoformat(),
            "samples": [sample],
            "dropped": 0,
        },
        separators=(",", ":"),
    ).encode()


def device_report(profile: DeviceProfile, name: str, agent_version: str) -> DeviceReport:
    """The hardware report a device with ``profile`` would send when it enrolls."""
    gpus: list[GpuInfo] = []
    if profile.kind == "jetson-orin-nano":
        assert profile.gpu_memory_total_bytes is not None
        gpus.append(
            GpuInfo(
                index=0,
                name="Orin (nvgpu)",
                memory_total_bytes=profile.gpu_memory_total_bytes,
                compute_capability="8.7",
                source="tegrastats",
            )
        )
        return DeviceReport(
            hostname=name,
            os="Linux-5.15.148-tegra-aarch64-with-glibc2.35",
            kernel="5.15.148-tegra",
            arch="aarch64",
            cpu_model="ARMv8 Processor rev 1 (v8l)",
            cpu_physical_cores=6,
            cpu_logical_cores=6,
            ram_total_bytes=profile.ram_total_bytes,
            ram_available_bytes=profile.ram_total_bytes // 2,
            is_jetson=True,
            jetson_model="NVIDIA Jetson Orin Nano Developer Kit",
            l4t_version="36.4.3",
            gpus=gpus,
            runtimes={"python": "3.10.12", "llama_cpp": "0.3.36", "simulated": agent_version},
            llama_gpu_offload=True,
        )
    if profile.gpu_memory_total_bytes is not None:
        gpus.append(
            GpuInfo(
                index=0,
                name="NVIDIA GeForce RTX 4070",
                memory_total_bytes=profile.gpu_memory_total_bytes,
                driver_version="580.82.07",
                cuda_version="13.0",
                compute_capability="8.9",
                source="nvml",
            )
        )
    return DeviceReport(
        hostname=name,
        os="Linux-6.1.0-28-amd64-x86_64-with-glibc2.36",
        kernel="6.1.0-28-amd64",
        arch="x86_64",
        cpu_model="Intel(R) Core(TM) i5-12400",
        cpu_physical_cores=6,
        cpu_logical_cores=12,
        ram_total_bytes=profile.ram_total_bytes,
        ram_available_bytes=profile.ram_total_bytes * 3 // 4,
        gpus=gpus,
        runtimes={"python": "3.11.2", "llama_cpp": "0.3.36", "simulated": agent_version},
        llama_gpu_offload=bool(gpus),
    )
