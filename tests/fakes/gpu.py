"""Fakes of the three GPU sources the probe reads: pynvml, jtop and the tegrastats tool.

:class:`FakeNvml` stands in for the ``pynvml`` module (nvidia-ml-py) with call
counters; :class:`FakeJtop` for ``jtop.jtop`` (jetson-stats); :func:`fake_tegrastats`
writes a shell script named ``tegrastats`` into a folder the test puts first on PATH
(the probe then runs it as a subprocess).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

__all__ = ["FakeJtop", "FakeNvml", "fake_tegrastats"]


class FakeNvml(types.ModuleType):
    """Just enough of pynvml (nvidia-ml-py) for the probe, with call counters."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, *, fail_init: bool = False, fail_temperature: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.fail_temperature = fail_temperature
        self.init_calls = 0
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.82.07"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle-{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA RTX 4000 Ada Generation" if handle == "handle-0" else b"NVIDIA L4"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return types.SimpleNamespace(total=20 * 2**30, used=3 * 2**30, free=17 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return types.SimpleNamespace(gpu=42, memory=7)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        if self.fail_temperature:
            raise self.NVMLError("Not Supported")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 51

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 123_456  # milliwatts


class FakeJtop:
    """Just enough of ``jtop.jtop`` (jetson-stats); ``fail_start`` as when its service is down."""

    fail_start = False

    def __init__(self) -> None:
        self.closed = False
        self.stats = {"GPU": 12.0, "Temp gpu": 44.0, "Power VDD_GPU_SOC": 2500}
        self.memory = {"RAM": {"tot": 7_950_016, "used": 1_000_000}}

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("The jtop.service is not active. Please run: sudo systemctl ...")

    def ok(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def fake_tegrastats(bin_dir: Path, script: str) -> None:
    """Put a ``tegrastats`` in ``bin_dir`` that runs the shell ``script``."""
    exe = bin_dir / "tegrastats"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)
