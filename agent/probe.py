"""Find out what this device is: CPU, memory, GPUs, Jetson board and installed runtimes.

Two layers, kept apart so the hard part can be tested without the hardware:

- pure parsers (``parse_*``, ``format_cuda_version``, ``jetson_compute_capability``)
  take the text a source produced (``/proc/cpuinfo``, ``/etc/nv_tegra_release``, a
  ``tegrastats`` line, jetson-stats' dictionary, a board's name) and return values or
  ``None``;
- a thin I/O shell (``probe_device``, ``GpuSampler``) reads the files, asks NVML,
  jetson-stats or ``tegrastats``, and feeds the parsers.

Every source is optional. A library that is not installed, a device that is not
there or a driver that refuses is reported as absent (``None``, an empty list, a
missing key), never raised: the agent must start on a CPU-only box. Third-party
exceptions (``pynvml.NVMLError``, jetson-stats' errors, ``OSError``) stop here.
Optional libraries are imported inside functions for the same reason.

Throttling (``GpuSample.throttled``, which degraded mode may open a breaker on) comes
from NVML's clock event reasons (:data:`NVML_THROTTLE_REASONS`). On a Jetson it stays
``None``: neither ``tegrastats`` nor jetson-stats reports whether a thermal or power
limit is holding the clocks down (only temperatures, which ``max_temperature_c`` uses).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from models.device import DeviceReport, GpuInfo, GpuSample, GpuSource

__all__ = [
    "GpuSampler",
    "format_cuda_version",
    "jetson_compute_capability",
    "local_zone",
    "parse_cpuinfo_model",
    "parse_device_tree_model",
    "parse_jtop_stats",
    "parse_meminfo",
    "parse_nv_tegra_release",
    "parse_tegrastats",
    "parse_tegrastats_ram",
    "probe_device",
    "probe_runtimes",
    "read_tegrastats_line",
    "sample_gpus",
    "zone_from_localtime",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

NV_TEGRA_RELEASE = Path("etc/nv_tegra_release")  # relative to the probed root
DEVICE_TREE_MODEL = Path("proc/device-tree/model")
CPUINFO = Path("proc/cpuinfo")
MEMINFO = Path("proc/meminfo")
TEGRASTATS_TIMEOUT_S = 2.0  # wait for tegrastats' first line at most this long (seconds)

# --------------------------------------------------------------------------- pure parsers

_CPUINFO_KEYS = ("model name", "Processor", "cpu model", "cpu")  # x86, old ARM, MIPS, POWER


def parse_cpuinfo_model(text: str) -> str | None:
    """The CPU's marketing name from ``/proc/cpuinfo``, or ``None`` when it names none.

    x86 and most ARM kernels say ``model name``; older ARM kernels ``Processor``
    (capitalised: lower-case ``processor`` is the core's index).
    """
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if sep and value and key in _CPUINFO_KEYS and key not in found:
            found[key] = value
    return next((found[k] for k in _CPUINFO_KEYS if k in found), None)


_MEMINFO_LINE = re.compile(r"^(MemTotal|MemAvailable):\s+(\d+)\s*kB", re.MULTILINE)


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """``(total, available)`` bytes from ``/proc/meminfo``, or ``None`` if either is missing."""
    values = {m.group(1): int(m.group(2)) * 1024 for m in _MEMINFO_LINE.finditer(text)}
    if "MemTotal" not in values or "MemAvailable" not in values:
        return None
    return values["MemTotal"], values["MemAvailable"]


_TEGRA_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_nv_tegra_release(text: str) -> str | None:
    """The L4T version (``"35.4.1"``) from ``/etc/nv_tegra_release``, or ``None``."""
    match = _TEGRA_RELEASE.search(text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def parse_device_tree_model(data: bytes) -> str | None:
    """The board name from ``/proc/device-tree/model`` (NUL-terminated bytes), or ``None``."""
    name = data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return name or None


def format_cuda_version(version: int) -> str:
    """NVML's integer CUDA driver version as ``"major.minor"``: 13000 -> ``"13.0"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


# Most specific first: an "Orin Nano" is an Orin, not the first Nano. Thor is 11.0 from
# CUDA 13 on (JetPack 7); AGX Xavier's device tree has said just "Jetson-AGX".
_JETSON_COMPUTE_CAPABILITY = (
    ("thor", "11.0"),
    ("orin", "8.7"),
    ("xavier", "7.2"),
    ("jetson-agx", "7.2"),
    ("tx2", "6.2"),
    ("tx1", "5.3"),
    ("nano", "5.3"),
)


def jetson_compute_capability(model: str | None) -> str | None:
    """A Jetson GPU's CUDA compute capability from the board's name, or ``None`` if unknown.

    ``model`` is ``/proc/device-tree/model``, e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    (8.7); Xavier is 7.2, TX2 6.2, TX1 and the first Nano 5.3, Thor 11.0.
    """
    name = (model or "").lower()
    return next((cc for key, cc in _JETSON_COMPUTE_CAPABILITY if key in name), None)


_GR3D = re.compile(r"\bGR3D_FREQ\s+(\d+(?:\.\d+)?)%")
_GR3D_ANY = re.compile(r"\bGR3D_FREQ\b")
_RAM = re.compile(r"\bRAM\s+(\d+)/(\d+)\s*([kKMG])B\b")
_TEMP = re.compile(r"(?<![\w@])([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_UNIT = {"k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30}
_SENSOR_OFF = -40.0  # tegrastats prints -256C for a powered-off sensor; nothing real is colder


def parse_tegrastats_ram(line: str) -> tuple[int, int] | None:
    """``(used, total)`` bytes from a ``tegrastats`` line's ``RAM 2345/7764MB``, or ``None``."""
    match = _RAM.search(line)
    if match is None:
        return None
    unit = _UNIT[match.group(3)]
    return int(match.group(1)) * unit, int(match.group(2)) * unit


def parse_tegrastats(line: str) -> GpuSample | None:
    """One ``tegrastats`` line as a reading of the Jetson's GPU (index 0), or ``None``.

    Understands the formats of L4T 32 to 36: ``GR3D_FREQ 37%`` and ``GR3D_FREQ 0%@921``
    for utilisation; ``gpu@40C``, ``GPU@40.5C`` for temperature (``-256C`` means the
    sensor is off); ``VDD_GPU_SOC 1234mW/1234mW`` or ``POM_5V_GPU 0/0`` for power,
    preferring a GPU-only rail over a shared ``VDD_CPU_GPU_CV`` one. The GPU shares
    RAM with the CPU, so used RAM is its memory use.
    """
    utilisation = _GR3D.search(line)
    ram = parse_tegrastats_ram(line)
    if utilisation is None and ram is None and not _GR3D_ANY.search(line):
        return None
    temperature: float | None = None
    for name, value in _TEMP.findall(line):
        if name.lower() == "gpu" and float(value) > _SENSOR_OFF:
            temperature = float(value)
            break
    rails = [(name, int(now)) for name, now, _avg in _RAIL.findall(line) if "GPU" in name]
    rails.sort(key=lambda rail: "CPU" in rail[0])  # a GPU-only rail first; stable otherwise
    return GpuSample(
        index=0,
        utilization_percent=min(float(utilisation.group(1)), 100.0) if utilisation else None,
        memory_used_bytes=ram[0] if ram else None,
        temperature_c=temperature,
        power_w=rails[0][1] / 1000 if rails else None,
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def parse_jtop_stats(
    stats: Mapping[str, Any], ram: Mapping[str, Any] | None = None
) -> GpuSample | None:
    """jetson-stats' ``jtop.stats`` (and optionally ``jtop.memory["RAM"]``) as a GPU reading.

    ``stats`` holds ``"GPU"`` (percent), ``"Temp gpu"``/``"Temp GPU"`` (Celsius, or
    ``"OFF"``) and ``"Power <rail>"`` (milliwatts); ``ram`` holds ``"used"`` in kB.
    Returns ``None`` when ``stats`` says nothing about the GPU.
    """
    utilisation = _number(stats.get("GPU"))
    temperature = next(
        (_number(v) for k, v in stats.items() if k.lower() in {"temp gpu", "temp_gpu"}), None
    )
    if temperature is not None and temperature <= _SENSOR_OFF:
        temperature = None
    rails = sorted(
        (k for k in stats if k.lower().startswith("power ") and "gpu" in k.lower()),
        key=lambda k: "cpu" in k.lower(),
    )
    power_mw = _number(stats[rails[0]]) if rails else None
    used_kb = _number(ram.get("used")) if ram is not None else None
    if utilisation is None and temperature is None and power_mw is None:
        return None
    return GpuSample(
        index=0,
        utilization_percent=min(max(utilisation, 0.0), 100.0) if utilisation is not None else None,
        memory_used_bytes=int(used_kb * 1024) if used_kb is not None and used_kb >= 0 else None,
        temperature_c=temperature,
        power_w=power_mw / 1000 if power_mw is not None and power_mw >= 0 else None,
    )


# --------------------------------------------------------------------------- I/O shell


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _guard(
    call: Callable[[], _T], errors: type[BaseException] | tuple[type[BaseException], ...]
) -> _T | None:
    """``call()``, or ``None`` when it raises one of ``errors`` (a field the device lacks)."""
    try:
        return call()
    except errors as exc:
        _log.debug("probe: %s", exc)
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nvml_open() -> Any | None:
    """The initialised ``pynvml`` module, or ``None`` without NVML; pair with ``_nvml_close``."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        _log.debug("probe: NVML unavailable: %s", exc)
        return None
    return pynvml


def _nvml_close(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except (nvml.NVMLError, OSError) as exc:
        _log.debug("probe: nvmlShutdown failed: %s", exc)


def _nvml_handles(nvml: Any) -> list[tuple[int, Any]]:
    count = _guard(nvml.nvmlDeviceGetCount, nvml.NVMLError) or 0
    handles = []
    for index in range(int(count)):
        handle = _guard(partial(nvml.nvmlDeviceGetHandleByIndex, index), nvml.NVMLError)
        if handle is not None:
            handles.append((index, handle))
    return handles


def _nvml_sample(nvml: Any, index: int, handle: Any) -> GpuSample:
    err = nvml.NVMLError
    memory = _guard(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), err)
    rates = _guard(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), err)
    temperature = _guard(
        lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), err
    )
    power_mw = _guard(lambda: nvml.nvmlDeviceGetPowerUsage(handle), err)
    return GpuSample(
        index=index,
        utilization_percent=float(rates.gpu) if rates is not None else None,
        memory_used_bytes=int(memory.used) if memory is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
        power_w=int(power_mw) / 1000 if power_mw is not None else None,
        throttled=_nvml_throttled(nvml, handle),
    )


# NVML's clock event ("throttle") reason bits that mean a thermal or power limit; the
# values are NVML's ABI (nvml.h), the same in pynvml's nvmlClocksEventReason* and older
# nvmlClocksThrottleReason* names. Idle, application clocks, sync boost and display
# clocks are not limits.
NVML_THROTTLE_REASONS = (
    0x04  # SwPowerCap: the driver holds clocks down to stay under the power limit
    | 0x08  # HwSlowdown: hardware slowdown (temperature or power brake)
    | 0x20  # SwThermalSlowdown: the driver cools the GPU or its memory
    | 0x40  # HwThermalSlowdown: the hardware does
    | 0x80  # HwPowerBrakeSlowdown: an external power brake (e.g. the power supply)
)


def _nvml_throttled(nvml: Any, handle: Any) -> bool | None:
    """Whether a thermal or power limit holds the clocks down; ``None`` if NVML cannot say.

    ``nvmlDeviceGetCurrentClocksEventReasons`` is the current name (nvidia-ml-py 12.535
    on); older pynvml only has ``nvmlDeviceGetCurrentClocksThrottleReasons``.
    """
    call = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    reasons = _guard(partial(call, handle), nvml.NVMLError) if call is not None else None
    return bool(int(reasons) & NVML_THROTTLE_REASONS) if reasons is not None else None


def _nvml_compute_capability(nvml: Any, handle: Any) -> str | None:
    """``"8.6"`` from NVML, or ``None`` (an older pynvml without the call, or an error)."""
    call = getattr(nvml, "nvmlDeviceGetCudaComputeCapability", None)
    pair = _guard(partial(call, handle), nvml.NVMLError) if call is not None else None
    if pair is None:
        return None
    try:
        major, minor = pair
        return f"{int(major)}.{int(minor)}"
    except (TypeError, ValueError):
        return None


def _nvml_gpus(
    nvml: Any, *, shared_ram_bytes: int | None, jetson_model: str | None = None
) -> list[GpuInfo]:
    """Every GPU NVML sees; on a Jetson (``shared_ram_bytes`` set) the board names the CC."""
    err = nvml.NVMLError
    board_cc = jetson_compute_capability(jetson_model) if shared_ram_bytes is not None else None
    driver = _guard(nvml.nvmlSystemGetDriverVersion, err)
    cuda = _guard(nvml.nvmlSystemGetCudaDriverVersion, err)
    gpus = []
    for index, handle in _nvml_handles(nvml):
        name = _guard(partial(nvml.nvmlDeviceGetName, handle), err)
        memory = _guard(partial(nvml.nvmlDeviceGetMemoryInfo, handle), err)
        sample = _nvml_sample(nvml, index, handle)
        total = int(memory.total) if memory is not None else shared_ram_bytes
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(name) if name is not None else "NVIDIA GPU",
                memory_total_bytes=total or 0,
                memory_used_bytes=sample.memory_used_bytes,
                utilization_percent=sample.utilization_percent,
                temperature_c=sample.temperature_c,
                power_w=sample.power_w,
                driver_version=_text(driver) if driver is not None else None,
                cuda_version=format_cuda_version(int(cuda)) if cuda is not None else None,
                compute_capability=_nvml_compute_capability(nvml, handle) or board_cc,
                source="nvml",
            )
        )
    return gpus


def read_tegrastats_line(timeout_s: float = TEGRASTATS_TIMEOUT_S) -> str | None:
    """One line from ``tegrastats --interval 100``, or ``None`` without the tool or output.

    Waits at most ``timeout_s`` seconds for the line, then stops the process.
    """
    exe = shutil.which("tegrastats")
    if exe is None:
        return None
    try:
        proc = subprocess.Popen(
            [exe, "--interval", "100"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    except OSError as exc:
        _log.debug("probe: cannot run tegrastats: %s", exc)
        return None
    try:
        if proc.stdout is None:  # pragma: no cover - stdout=PIPE always gives one
            return None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        return line.strip() or None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _jtop_reading(jetson: Any) -> GpuSample | None:
    memory = getattr(jetson, "memory", None)
    ram = memory.get("RAM") if isinstance(memory, Mapping) else None
    return parse_jtop_stats(dict(jetson.stats), ram if isinstance(ram, Mapping) else None)


def _open_jtop() -> Any | None:
    """A started ``jtop`` client, or ``None`` without jetson-stats or its service."""
    try:
        from jtop import jtop
    except ImportError:
        return None
    client = jtop()
    try:
        client.start()
    except Exception as exc:  # jetson-stats raises its own JtopException and plain ones
        _log.debug("probe: jtop unavailable: %s", exc)
        return None
    return client


def _close_jtop(client: Any) -> None:
    try:
        client.close()
    except Exception as exc:  # a client whose service died may fail to close
        _log.debug("probe: jtop close failed: %s", exc)


def _jtop_sample(client: Any) -> GpuSample | None:
    try:
        return _jtop_reading(client) if client.ok() else None
    except Exception as exc:  # as above: jetson-stats' errors are not one tree
        _log.debug("probe: jtop reading failed: %s", exc)
        return None


def _jetson_live() -> tuple[GpuSample, GpuSource, int | None] | None:
    """A reading of the Jetson's GPU, its source and (tegrastats only) total RAM."""
    client = _open_jtop()
    if client is not None:
        try:
            sample = _jtop_sample(client)
        finally:
            _close_jtop(client)
        if sample is not None:
            return sample, "jtop", None
    line = read_tegrastats_line()
    if line is None:
        return None
    sample = parse_tegrastats(line)
    ram = parse_tegrastats_ram(line)
    return (sample, "tegrastats", ram[1] if ram else None) if sample is not None else None


def _is_jetson(root: Path) -> tuple[bool, str | None, str | None]:
    release = _read_text(root / NV_TEGRA_RELEASE)
    model_bytes = _read_bytes(root / DEVICE_TREE_MODEL)
    model = parse_device_tree_model(model_bytes) if model_bytes is not None else None
    l4t = parse_nv_tegra_release(release) if release is not None else None
    is_jetson = release is not None or (model is not None and "jetson" in model.lower())
    return is_jetson, model if is_jetson else None, l4t


def probe_runtimes() -> tuple[dict[str, str], bool]:
    """Installed runtimes and their versions, and whether llama.cpp can offload to a GPU.

    Keys: ``python`` always; ``edgefleet``, ``llama_cpp``, ``onnxruntime`` and
    ``onnxruntime_providers`` (comma-separated) only when installed.
    """
    runtimes = {"python": platform.python_version()}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        runtimes["edgefleet"] = importlib.metadata.version("edgefleet")
    gpu_offload = False
    try:
        import llama_cpp

        runtimes["llama_cpp"] = str(llama_cpp.__version__)
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:  # not installed, or its shared library fails to load
        _log.debug("probe: llama_cpp unavailable: %s", exc)
    try:
        import onnxruntime

        runtimes["onnxruntime"] = str(onnxruntime.__version__)
        runtimes["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except Exception as exc:  # as above
        _log.debug("probe: onnxruntime unavailable: %s", exc)
    return runtimes, gpu_offload


def _cpu_counts() -> tuple[int, int]:
    logical = os.cpu_count() or 1
    physical: int | None = None
    try:
        import psutil

        logical = psutil.cpu_count(logical=True) or logical
        physical = psutil.cpu_count(logical=False)
    except (ImportError, OSError) as exc:
        _log.debug("probe: psutil cpu_count failed: %s", exc)
    return physical or logical, logical


def _ram(root: Path) -> tuple[int, int]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except (ImportError, OSError) as exc:
        _log.debug("probe: psutil virtual_memory failed: %s", exc)
    meminfo = _read_text(root / MEMINFO)
    parsed = parse_meminfo(meminfo) if meminfo is not None else None
    return parsed if parsed is not None else (0, 0)


def probe_device(*, root: Path = Path("/")) -> DeviceReport:
    """Probe this device once; never raises for a missing library, file or device.

    ``root`` is where ``/etc`` and ``/proc`` are read from (tests point it elsewhere);
    libraries, NVML and ``tegrastats`` are always this machine's.
    """
    physical, logical = _cpu_counts()
    ram_total, ram_available = _ram(root)
    cpuinfo = _read_text(root / CPUINFO)
    cpu_model = (parse_cpuinfo_model(cpuinfo) if cpuinfo is not None else None) or (
        platform.processor() or None
    )
    is_jetson, jetson_model, l4t = _is_jetson(root)

    gpus: list[GpuInfo] = []
    nvml = _nvml_open()
    if nvml is not None:
        try:
            gpus = _nvml_gpus(
                nvml, shared_ram_bytes=ram_total if is_jetson else None, jetson_model=jetson_model
            )
        finally:
            _nvml_close(nvml)
    if not gpus and is_jetson:
        live = _jetson_live()
        if live is not None:
            sample, source, total = live
            gpus = [
                GpuInfo(
                    index=0,
                    name=jetson_model or "NVIDIA Jetson GPU",
                    memory_total_bytes=total if total is not None else ram_total,
                    memory_used_bytes=sample.memory_used_bytes,
                    utilization_percent=sample.utilization_percent,
                    temperature_c=sample.temperature_c,
                    power_w=sample.power_w,
                    compute_capability=jetson_compute_capability(jetson_model),
                    source=source,
                )
            ]
        else:
            _log.info("probe: Jetson without jetson-stats or tegrastats: no GPU readings")

    runtimes, gpu_offload = probe_runtimes()
    return DeviceReport(
        hostname=socket.gethostname(),
        os=platform.platform(),
        kernel=platform.release(),
        arch=platform.machine(),
        cpu_model=cpu_model,
        cpu_physical_cores=physical,
        cpu_logical_cores=logical,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        is_jetson=is_jetson,
        jetson_model=jetson_model,
        l4t_version=l4t,
        gpus=gpus,
        runtimes=runtimes,
        llama_gpu_offload=gpu_offload,
        timezone=local_zone(root),
    )


def zone_from_localtime(target: str) -> str | None:
    """The IANA name in an ``/etc/localtime`` link target (``.../zoneinfo/Europe/Berlin``)."""
    _, found, name = target.partition("zoneinfo/")
    name = name.removeprefix("posix/").removeprefix("right/")
    return name if found and name and not name.startswith("/") else None


def local_zone(root: Path = Path("/")) -> str | None:
    """The device's time zone as an IANA name, for rollout maintenance windows; None if unsure."""
    name = os.environ.get("TZ", "").removeprefix(":")
    if "/" in name and not name.startswith("/"):
        return name
    try:
        link = str((root / "etc/localtime").readlink())
    except OSError:
        link = ""
    from_link = zone_from_localtime(link)
    if from_link:
        return from_link
    text = (_read_text(root / "etc/timezone") or "").strip()  # Debian's older spelling
    return text or None


# --------------------------------------------------------------------------- live sampling

_Backend = Literal["nvml", "jtop", "tegrastats", "none"]


class GpuSampler:
    """Cheap, repeatable GPU readings for metrics and telemetry; one per agent, not global.

    The first ``sample()`` picks a source (NVML, else on a Jetson jetson-stats, else
    ``tegrastats``) and keeps it open; a device without any is remembered, so later
    calls cost nothing. Thread-safe. ``close()`` (or leaving the ``with`` block)
    releases NVML or the jtop client.
    """

    def __init__(self, *, root: Path = Path("/")) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._backend: _Backend | None = None
        self._nvml: Any = None
        self._handles: list[tuple[int, Any]] = []
        self._jtop: Any = None

    @property
    def backend(self) -> _Backend | None:
        """The source in use, ``"none"`` when there is none, ``None`` before the first sample."""
        return self._backend

    def sample(self) -> list[GpuSample]:
        """One reading per GPU; ``[]`` when this device has none that can be read."""
        with self._lock:
            if self._backend is None:
                self._backend = self._choose()
            if self._backend == "nvml":
                return [_nvml_sample(self._nvml, i, h) for i, h in self._handles]
            if self._backend == "jtop":
                reading = _jtop_sample(self._jtop)
            elif self._backend == "tegrastats":
                line = read_tegrastats_line()
                reading = parse_tegrastats(line) if line is not None else None
            else:
                return []
            return [reading] if reading is not None else []

    def _choose(self) -> _Backend:
        nvml = _nvml_open()
        if nvml is not None:
            handles = _nvml_handles(nvml)
            if handles:
                self._nvml, self._handles = nvml, handles
                return "nvml"
            _nvml_close(nvml)
        if not _is_jetson(self._root)[0]:
            return "none"
        self._jtop = _open_jtop()
        if self._jtop is not None:
            return "jtop"
        return "tegrastats" if shutil.which("tegrastats") else "none"

    def close(self) -> None:
        """Release NVML or jtop; the sampler may be used again afterwards (it reopens)."""
        with self._lock:
            if self._nvml is not None:
                _nvml_close(self._nvml)
            if self._jtop is not None:
                _close_jtop(self._jtop)
            self._nvml, self._handles, self._jtop, self._backend = None, [], None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def sample_gpus() -> list[GpuSample]:
    """One-shot readings of every GPU (``[]`` when none); hold a ``GpuSampler`` to repeat."""
    with GpuSampler() as sampler:
        return sampler.sample()
