from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

import models.device
from models.device import DeviceReport, GpuInfo, GpuSample


def _report(**overrides: object) -> DeviceReport:
    fields: dict[str, object] = {
        "hostname": "jetson-01",
        "os": "Linux-5.15.148-tegra-aarch64-with-glibc2.35",
        "kernel": "5.15.148-tegra",
        "arch": "aarch64",
        "cpu_model": "ARMv8 Processor rev 1 (v8l)",
        "cpu_physical_cores": 6,
        "cpu_logical_cores": 6,
        "ram_total_bytes": 7_950_000_000,
        "ram_available_bytes": 5_000_000_000,
        "is_jetson": True,
        "jetson_model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        "l4t_version": "36.4.3",
        "gpus": [
            GpuInfo(
                index=0,
                name="Orin (nvgpu)",
                memory_total_bytes=7_950_000_000,
                utilization_percent=37.0,
                temperature_c=40.0,
                power_w=0.987,
                source="tegrastats",
            )
        ],
        "runtimes": {"python": "3.11.7", "llama_cpp": "0.3.36"},
        "llama_gpu_offload": True,
    }
    fields.update(overrides)
    return DeviceReport.model_validate(fields)


def test_public_api() -> None:
    assert sorted(models.device.__all__) == ["DeviceReport", "GpuInfo", "GpuSample", "GpuSource"]


def test_report_defaults_schema_version_and_utc_timestamp() -> None:
    before = datetime.now(UTC)
    report = _report()
    assert report.schema_version == 1
    assert report.probed_at.tzinfo is not None
    assert before <= report.probed_at <= datetime.now(UTC)
    assert report.gpus[0].vendor == "nvidia"


def test_report_round_trips_through_json() -> None:
    report = _report()
    assert DeviceReport.model_validate_json(report.model_dump_json()) == report


def test_report_is_frozen() -> None:
    report = _report()
    with pytest.raises(ValidationError):
        report.hostname = "other"  # type: ignore[misc]


def test_report_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _report(gpu_count=1)


def test_report_rejects_naive_timestamp() -> None:
    with pytest.raises(ValidationError):
        _report(probed_at=datetime(2025, 1, 1, 12, 0))


def test_report_rejects_zero_cores() -> None:
    with pytest.raises(ValidationError):
        _report(cpu_logical_cores=0)


@pytest.mark.parametrize(
    "bad",
    [
        {"source": "cuda"},
        {"vendor": "amd"},
        {"utilization_percent": 101.0},
        {"memory_total_bytes": -1},
        {"power_w": -0.5},
    ],
)
def test_gpu_info_rejects_out_of_range(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "index": 0,
        "name": "NVIDIA H100",
        "memory_total_bytes": 80 * 2**30,
        "source": "nvml",
    }
    fields.update(bad)
    with pytest.raises(ValidationError):
        GpuInfo.model_validate(fields)


def test_gpu_sample_needs_only_an_index() -> None:
    sample = GpuSample(index=1)
    assert sample.model_dump() == {
        "index": 1,
        "utilization_percent": None,
        "memory_used_bytes": None,
        "temperature_c": None,
        "power_w": None,
        "throttled": None,
    }
    with pytest.raises(ValidationError):
        GpuSample(index=-1)


def test_gpu_sample_says_whether_the_gpu_is_throttled() -> None:
    assert GpuSample(index=0, throttled=True).throttled is True
    assert GpuSample.model_validate_json('{"index": 0, "throttled": false}').throttled is False
    with pytest.raises(ValidationError):
        GpuSample.model_validate({"index": 0, "throttled": "sometimes"})
