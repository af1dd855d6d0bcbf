"""What a device is and what its accelerators are doing, as the agent reports it.

``DeviceReport`` is probed once at start-up and later travels to the fleet, so it
carries a schema version; ``GpuSample`` is the cheap live reading behind metrics and
telemetry. Both are frozen values: every field the probe could not read is ``None``
(or absent from ``runtimes``), never a guess.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = ["DeviceReport", "GpuInfo", "GpuSample", "GpuSource"]

GpuSource = Literal["nvml", "tegrastats", "jtop"]
"""Where a GPU reading came from: NVML on discrete GPUs, jetson-stats or tegrastats on Jetson."""


class GpuInfo(BaseModel):
    """One GPU as found at probe time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    name: str
    vendor: Literal["nvidia"] = "nvidia"
    memory_total_bytes: int = Field(ge=0)  # on Jetson: the RAM shared with the CPU
    memory_used_bytes: int | None = Field(default=None, ge=0)
    utilization_percent: float | None = Field(default=None, ge=0, le=100)
    temperature_c: float | None = None  # degrees Celsius
    power_w: float | None = Field(default=None, ge=0)  # watts, instantaneous
    driver_version: str | None = None  # e.g. "580.82.07"
    cuda_version: str | None = None  # highest CUDA the driver supports, e.g. "13.0"
    compute_capability: str | None = None  # e.g. "8.7" (Orin), "8.9" (Ada); variant requirements
    source: GpuSource


class GpuSample(BaseModel):
    """A live reading of one GPU; every measurement is optional."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    utilization_percent: float | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0)
    temperature_c: float | None = None  # degrees Celsius
    power_w: float | None = Field(default=None, ge=0)  # watts, instantaneous
    throttled: bool | None = None  # clocks held down by a thermal or power limit; None: unknown


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DeviceReport(BaseModel):
    """The hardware and software a device offers, probed once when the agent starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    hostname: str
    os: str  # platform.platform()
    kernel: str  # platform.release()
    arch: str  # platform.machine(): "x86_64", "aarch64", ...
    cpu_model: str | None = None
    cpu_physical_cores: int = Field(ge=1)
    cpu_logical_cores: int = Field(ge=1)
    ram_total_bytes: int = Field(ge=0)
    ram_available_bytes: int = Field(ge=0)
    is_jetson: bool = False
    jetson_model: str | None = None  # /proc/device-tree/model, e.g. "NVIDIA Jetson Orin Nano ..."
    l4t_version: str | None = None  # from /etc/nv_tegra_release, e.g. "36.4.0"
    gpus: list[GpuInfo] = Field(default_factory=list)
    runtimes: dict[str, str] = Field(default_factory=dict)  # name -> version; absent: missing
    llama_gpu_offload: bool = False  # llama.cpp was built with a GPU backend
    timezone: str | None = None  # IANA name, e.g. "Europe/Berlin": maintenance windows
    probed_at: AwareDatetime = Field(default_factory=_utc_now)
