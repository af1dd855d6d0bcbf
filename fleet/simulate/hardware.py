"""Named hardware profiles for simulated devices, and how a fleet mixes them. Pure.

By default a simulated fleet is a mix of three kinds (:func:`.telemetry.profile_for`).
A rollout that chooses a variant by hardware (memory, architecture, GPU compute
capability) needs a fleet described more precisely: ``--hardware`` names profiles from
:data:`HARDWARE`, each a :class:`Hardware` that makes both what the device reports when
it enrolls (:meth:`Hardware.report`, a :class:`~models.device.DeviceReport` as the
agent's probe would fill it) and how fast it serves (:meth:`Hardware.profile`, the
:class:`~.telemetry.DeviceProfile` behind its telemetry, varied a little per device).

:class:`HardwareMix` assigns profiles to device indices, round-robin or by weight
(``pi4-4g:3,orin-nano-8g:1``: three Raspberry Pis for each Orin), interleaved so
that any run of consecutive indices holds about the right proportions.

=================  =======  =======  ======================================  ==========
name               arch     RAM      GPU                                     cc
=================  =======  =======  ======================================  ==========
pi4-4g             aarch64  4 GB     none (Raspberry Pi 4)                   -
x86-cpu-2g         x86_64   2 GB     none (a small Celeron box)              -
x86-cpu-8g         x86_64   8 GB     none                                    -
x86-cpu-16g        x86_64   16 GB    none                                    -
orin-nano-8g       aarch64  8 GB     Jetson Orin Nano, memory shared         8.7
orin-agx-32g       aarch64  32 GB    Jetson AGX Orin, memory shared          8.7
orin-agx-64g       aarch64  64 GB    Jetson AGX Orin, memory shared          8.7
x86-rtx3060-16g    x86_64   16 GB    GeForce RTX 3060, 12 GiB                8.6
x86-rtx4090-64g    x86_64   64 GB    GeForce RTX 4090, 24 GiB                8.9
=================  =======  =======  ======================================  ==========
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet.simulate.telemetry import GB, MB, DeviceProfile
from models.device import DeviceReport, GpuInfo

__all__ = ["HARDWARE", "Hardware", "HardwareMix"]

GIB = 1 << 30
_JETSON_OS = "Linux-5.15.148-tegra-aarch64-with-glibc2.35"
_JETSON_KERNEL = "5.15.148-tegra"
_DEBIAN_OS = "Linux-6.1.0-28-amd64-x86_64-with-glibc2.36"
_DEBIAN_KERNEL = "6.1.0-28-amd64"
_MAX_CYCLE = 10_000  # weights add up to at most this


@dataclass(frozen=True)
class Hardware:
    """One kind of device: what it reports at enrollment and how fast it serves.

    Serving traits are ranges (low, high); each device draws its own value once.
    """

    name: str
    arch: str  # platform.machine()
    os: str
    kernel: str
    cpu_model: str
    cpu_cores: tuple[int, int]  # physical, logical
    ram_bytes: int
    python: str = "3.11.2"
    jetson_model: str | None = None  # set: a Jetson, whose GPU shares the RAM
    l4t_version: str | None = None
    gpu_name: str | None = None  # None: no GPU
    gpu_memory_bytes: int | None = None
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    # serving, for telemetry
    load: float = 1.0  # multiplies the device's base request rate
    latency_ms: tuple[float, float] = (2200, 3800)
    ttft_ms: tuple[float, float] = (250, 600)
    tokens_per_s: tuple[float, float] = (18, 30)
    slots: int = 2
    queue_limit: int = 16
    model_memory_mb: tuple[float, float] = (300, 380)
    idle_power_w: tuple[float, float] = (0.0, 0.0)  # of the GPU (or the Jetson module)
    max_power_w: tuple[float, float] = (0.0, 0.0)
    idle_temperature_c: tuple[float, float] = (0.0, 0.0)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    def gpus(self) -> list[GpuInfo]:
        if self.gpu_name is None:
            return []
        jetson = self.jetson_model is not None
        return [
            GpuInfo(
                index=0,
                name=self.gpu_name,
                memory_total_bytes=self.gpu_memory_bytes or self.ram_bytes,
                driver_version=self.driver_version,
                cuda_version=self.cuda_version,
                compute_capability=self.compute_capability,
                source="tegrastats" if jetson else "nvml",
            )
        ]

    def report(self, hostname: str, agent_version: str) -> DeviceReport:
        """The hardware report such a device sends when it enrolls."""
        jetson = self.jetson_model is not None
        physical, logical = self.cpu_cores
        gpus = self.gpus()
        return DeviceReport(
            hostname=hostname,
            os=self.os,
            kernel=self.kernel,
            arch=self.arch,
            cpu_model=self.cpu_model,
            cpu_physical_cores=physical,
            cpu_logical_cores=logical,
            ram_total_bytes=self.ram_bytes,
            ram_available_bytes=self.ram_bytes // 2 if jetson else self.ram_bytes * 3 // 4,
            is_jetson=jetson,
            jetson_model=self.jetson_model,
            l4t_version=self.l4t_version,
            gpus=gpus,
            runtimes={"python": self.python, "llama_cpp": "0.3.36", "simulated": agent_version},
            llama_gpu_offload=bool(gpus),
        )

    def profile(self, index: int, *, seed: int = 0) -> DeviceProfile:
        """Device ``index``'s serving traits: this hardware's ranges, drawn per device."""
        rng = random.Random(f"{seed}:{index}:profile:{self.name}")  # noqa: S311 (simulated)
        spread = rng.uniform
        rate = math.exp(rng.gauss(math.log(0.4), 0.8)) * self.load
        gpu_total = None
        if self.has_gpu:
            gpu_total = self.gpu_memory_bytes or self.ram_bytes
        return DeviceProfile(
            kind=self.name,
            base_rate_rps=rate,
            latency_ms=spread(*self.latency_ms),
            ttft_ms=spread(*self.ttft_ms),
            tokens_per_s=spread(*self.tokens_per_s),
            slots=self.slots,
            queue_limit=self.queue_limit,
            model_memory_bytes=int(spread(*self.model_memory_mb) * MB),
            ram_total_bytes=self.ram_bytes,
            gpu_memory_total_bytes=gpu_total,
            idle_power_w=spread(*self.idle_power_w),
            max_power_w=spread(*self.max_power_w),
            idle_temperature_c=spread(*self.idle_temperature_c),
        )


def _jetson(name: str, model: str, cores: tuple[int, int], ram: int, **serving: Any) -> Hardware:
    return Hardware(
        name=name,
        arch="aarch64",
        os=_JETSON_OS,
        kernel=_JETSON_KERNEL,
        cpu_model="ARMv8 Processor rev 1 (v8l)",
        cpu_cores=cores,
        ram_bytes=ram,
        python="3.10.12",
        jetson_model=model,
        l4t_version="36.4.0",
        gpu_name="Orin (nvgpu)",
        compute_capability="8.7",
        **serving,
    )


def _x86(name: str, cpu: str, cores: tuple[int, int], ram: int, **rest: Any) -> Hardware:
    return Hardware(
        name=name,
        arch="x86_64",
        os=_DEBIAN_OS,
        kernel=_DEBIAN_KERNEL,
        cpu_model=cpu,
        cpu_cores=cores,
        ram_bytes=ram,
        **rest,
    )


def _rtx(name: str, memory: int, cc: str) -> dict[str, Any]:
    return {
        "gpu_name": name,
        "gpu_memory_bytes": memory,
        "compute_capability": cc,
        "driver_version": "580.82.07",
        "cuda_version": "13.0",
    }


HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            name="pi4-4g",
            arch="aarch64",
            os="Linux-6.6.51+rpt-rpi-v8-aarch64-with-glibc2.36",
            kernel="6.6.51+rpt-rpi-v8",
            cpu_model="Cortex-A72",
            cpu_cores=(4, 4),
            ram_bytes=4 * GB - 120 * MB,
            load=0.3,
            latency_ms=(6000, 9000),
            ttft_ms=(900, 1600),
            tokens_per_s=(5, 8),
            slots=1,
            queue_limit=8,
            model_memory_mb=(280, 330),
        ),
        _x86(
            "x86-cpu-2g",
            "Intel(R) Celeron(R) N4020 CPU @ 1.10GHz",
            (2, 2),
            2 * GB - 90 * MB,
            load=0.3,
            latency_ms=(4500, 6500),
            ttft_ms=(600, 1000),
            tokens_per_s=(8, 13),
            slots=1,
            queue_limit=8,
            model_memory_mb=(280, 330),
        ),
        _x86(
            "x86-cpu-8g",
            "Intel(R) Core(TM) i3-10100 CPU @ 3.60GHz",
            (4, 8),
            8 * GB - 200 * MB,
            load=0.6,
            latency_ms=(2600, 3800),
            ttft_ms=(300, 600),
            tokens_per_s=(16, 24),
        ),
        _x86(
            "x86-cpu-16g",
            "Intel(R) Core(TM) i5-12400",
            (6, 12),
            16 * GB - 300 * MB,
            load=0.6,
            latency_ms=(2000, 3000),
            ttft_ms=(220, 450),
            tokens_per_s=(22, 32),
        ),
        _jetson(
            "orin-nano-8g",
            "NVIDIA Jetson Orin Nano Developer Kit",
            (6, 6),
            8 * GB - 50 * MB,
            latency_ms=(900, 1500),
            ttft_ms=(70, 140),
            tokens_per_s=(45, 65),
            slots=4,
            queue_limit=32,
            model_memory_mb=(330, 420),
            idle_power_w=(3.0, 4.5),
            max_power_w=(12.0, 15.0),
            idle_temperature_c=(38, 46),
        ),
        _jetson(
            "orin-agx-32g",
            "NVIDIA Jetson AGX Orin 32GB",
            (8, 8),
            32 * GB - 200 * MB,
            load=2.0,
            latency_ms=(380, 650),
            ttft_ms=(30, 70),
            tokens_per_s=(110, 170),
            slots=8,
            queue_limit=64,
            model_memory_mb=(400, 600),
            idle_power_w=(7, 10),
            max_power_w=(35, 40),
            idle_temperature_c=(36, 44),
        ),
        _jetson(
            "orin-agx-64g",
            "NVIDIA Jetson AGX Orin Developer Kit",
            (12, 12),
            64 * GB - 300 * MB,
            load=2.5,
            latency_ms=(330, 560),
            ttft_ms=(25, 60),
            tokens_per_s=(130, 200),
            slots=8,
            queue_limit=64,
            model_memory_mb=(400, 600),
            idle_power_w=(8, 12),
            max_power_w=(45, 60),
            idle_temperature_c=(36, 44),
        ),
        _x86(
            "x86-rtx3060-16g",
            "Intel(R) Core(TM) i5-12400",
            (6, 12),
            16 * GB - 300 * MB,
            load=3.0,
            latency_ms=(300, 520),
            ttft_ms=(20, 45),
            tokens_per_s=(150, 230),
            slots=8,
            queue_limit=64,
            model_memory_mb=(600, 900),
            idle_power_w=(12, 18),
            max_power_w=(150, 170),
            idle_temperature_c=(32, 40),
            **_rtx("NVIDIA GeForce RTX 3060", 12 * GIB, "8.6"),
        ),
        _x86(
            "x86-rtx4090-64g",
            "AMD Ryzen 9 7950X 16-Core Processor",
            (16, 32),
            64 * GB,
            load=3.0,
            latency_ms=(120, 220),
            ttft_ms=(8, 20),
            tokens_per_s=(350, 500),
            slots=16,
            queue_limit=128,
            model_memory_mb=(700, 1000),
            idle_power_w=(20, 30),
            max_power_w=(380, 450),
            idle_temperature_c=(30, 38),
            **_rtx("NVIDIA GeForce RTX 4090", 24 * GIB, "8.9"),
        ),
    )
}
"""Every named profile, by name."""


def _interleave(entries: tuple[tuple[Hardware, int], ...]) -> tuple[Hardware, ...]:
    """One cycle of smooth weighted round-robin: weights 3 and 1 give a, a, b, a."""
    total = sum(weight for _, weight in entries)
    current = [0] * len(entries)
    cycle = []
    for _ in range(total):
        for i, (_, weight) in enumerate(entries):
            current[i] += weight
        best = max(range(len(entries)), key=lambda i: current[i])
        current[best] -= total
        cycle.append(entries[best][0])
    return tuple(cycle)


@dataclass(frozen=True)
class HardwareMix:
    """Which profile each device index gets: a fixed cycle over weighted profiles."""

    entries: tuple[tuple[Hardware, int], ...]
    cycle: tuple[Hardware, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a hardware mix needs at least one profile")
        if any(weight < 1 for _, weight in self.entries):
            raise ValueError("hardware weights are whole numbers from 1")
        if sum(weight for _, weight in self.entries) > _MAX_CYCLE:
            raise ValueError(f"hardware weights add up to more than {_MAX_CYCLE}")
        object.__setattr__(self, "cycle", _interleave(self.entries))

    @classmethod
    def of(cls, *names: str) -> HardwareMix:
        """Round-robin over ``names`` (each from :data:`HARDWARE`)."""
        return cls.parse(names)

    @classmethod
    def parse(cls, values: Iterable[str]) -> HardwareMix:
        """``["pi4-4g:3,orin-nano-8g", "x86-cpu-8g"]``: names, comma-separated or repeated.

        ``NAME:WEIGHT`` gives a profile WEIGHT devices in each cycle (1 without a weight).
        :class:`ValueError` names an unknown profile or a bad weight.
        """
        entries: dict[str, int] = {}
        for value in values:
            for item in value.split(","):
                name, colon, weight_text = item.strip().partition(":")
                if name not in HARDWARE:
                    known = ", ".join(HARDWARE)
                    raise ValueError(f"unknown hardware profile {name!r}; known: {known}")
                if name in entries:
                    raise ValueError(f"hardware profile {name!r} is given twice")
                weight = 1
                if colon:
                    if not weight_text.strip().isdigit() or int(weight_text) < 1:
                        raise ValueError(f"{item.strip()!r}: the weight is a whole number from 1")
                    weight = int(weight_text)
                entries[name] = weight
        return cls(tuple((HARDWARE[name], weight) for name, weight in entries.items()))

    def pick(self, index: int) -> Hardware:
        """Device ``index``'s profile."""
        return self.cycle[index % len(self.cycle)]

    def __str__(self) -> str:
        return ",".join(f"{hw.name}:{weight}" for hw, weight in self.entries)
