import importlib.util
import platform
import sys
import types
from datetime import UTC
from pathlib import Path

import pytest

import agent.probe
from agent.probe import (
    GpuSampler,
    format_cuda_version,
    jetson_compute_capability,
    parse_cpuinfo_model,
    parse_device_tree_model,
    parse_jtop_stats,
    parse_meminfo,
    parse_nv_tegra_release,
    parse_tegrastats,
    parse_tegrastats_ram,
    probe_device,
    probe_runtimes,
    read_tegrastats_line,
    sample_gpus,
)
from models.device import DeviceReport, GpuSample
from tests.fakes.gpu import FakeJtop, FakeNvml, fake_tegrastats

MIB = 2**20

# Jetson Orin Nano, L4T 36 (the format in the brief).
ORIN_NANO = (
    "RAM 2345/7764MB (lfb 1x4MB) SWAP 0/3882MB (cached 0MB) CPU [12%@1510,5%@1510,3%@1510,"
    "8%@1510] EMC_FREQ 0% GR3D_FREQ 37% cpu@41.5C gpu@40C tj@42.5C soc@39C "
    "VDD_IN 4321mW/4321mW VDD_CPU_GPU_CV 987mW/987mW"
)
# Jetson Nano, L4T 32: GR3D_FREQ with a clock, upper-case sensors, unit-less POM rails.
NANO = (
    "RAM 1540/3964MB (lfb 4x4MB) SWAP 0/1982MB (cached 0MB) CPU [9%@1479,6%@1479,5%@1479,"
    "4%@1479] EMC_FREQ 0% GR3D_FREQ 0%@921 APE 25 PLL@35C CPU@37.5C PMIC@100C GPU@36C "
    "AO@43.5C thermal@36.75C POM_5V_IN 2306/2306 POM_5V_GPU 125/110 POM_5V_CPU 449/449"
)
# Jetson AGX Xavier, L4T 35: decimal GPU temperature, "GPU" rail without units.
XAVIER = (
    "RAM 3123/15692MB (lfb 2645x4MB) SWAP 0/7846MB (cached 0MB) CPU [2%@1190,1%@1190,"
    "off,off,off,off,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 99%@1377 APE 150 MTS fg 0% bg 0% "
    "AO@37C GPU@38.5C Tdiode@39.25C PMIC@50C AUX@36.5C CPU@38C thermal@37.85C Tboard@37C "
    "GPU 8544/8544 CPU 305/305 SOC 1525/1525 CV 0/0 VDDRQ 458/458 SYS5V 2096/2096"
)
# Orin Nano, L4T 36.4 with a timestamp; GPU idle and its sensor off (-256C).
ORIN_IDLE = (
    "11-21-2025 15:44:01 RAM 3050/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,off,off] GR3D_FREQ 0% cpu@46.468C soc2@45.281C "
    "soc0@45.843C gpu@-256C tj@46.468C soc1@45.812C VDD_IN 4420mW/4420mW "
    "VDD_CPU_GPU_CV 479mW/479mW VDD_SOC 1398mW/1398mW"
)
# AGX Orin: a GPU-only rail and a shared one; the GPU-only one wins.
AGX_ORIN = (
    "RAM 9152/62841MB (lfb 6x4MB) SWAP 0/31421MB (cached 0MB) CPU [3%@2201,2%@2201] "
    "GR3D_FREQ 81% cpu@52.1C soc2@49.3C gpu@55.2C tj@55.2C VDD_CPU_GPU_CV 2200mW/2100mW "
    "VDD_GPU_SOC 7788mW/7600mW VIN_SYS_5V0 4500mW/4500mW"
)

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
cpu MHz\t\t: 2899.968
cpu cores\t: 1

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
"""
OLD_ARM_CPUINFO = """Processor\t: ARMv7 Processor rev 3 (v7l)
processor\t: 0
BogoMIPS\t: 38.40
Hardware\t: BCM2709
"""
ARM64_CPUINFO = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
CPU part\t: 0xd42
"""


def test_public_api() -> None:
    assert sorted(agent.probe.__all__) == [
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


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (X86_CPUINFO, "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"),
        (OLD_ARM_CPUINFO, "ARMv7 Processor rev 3 (v7l)"),
        (
            "cpu\t\t: POWER9 (architected), altivec supported\n",
            "POWER9 (architected), altivec supported",
        ),
        (ARM64_CPUINFO, None),
        ("model name\t:\n", None),
        ("", None),
    ],
)
def test_parse_cpuinfo_model(text: str, expected: str | None) -> None:
    assert parse_cpuinfo_model(text) == expected


def test_parse_cpuinfo_prefers_model_name_over_processor() -> None:
    text = "Processor\t: AArch64 Processor rev 1 (aarch64)\nmodel name\t: ARMv8 Processor\n"
    assert parse_cpuinfo_model(text) == "ARMv8 Processor"


def test_parse_meminfo() -> None:
    text = "MemTotal:        7950016 kB\nMemFree:  100 kB\nMemAvailable:    5123456 kB\n"
    assert parse_meminfo(text) == (7950016 * 1024, 5123456 * 1024)
    assert parse_meminfo("MemTotal: 100 kB\n") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "# R35 (release), REVISION: 4.1, GID: 33958178, BOARD: t186ref, EABI: aarch64, "
            "DATE: Tue Aug  1 19:57:35 UTC 2023\n# KERNEL_VARIANT: oot\n",
            "35.4.1",
        ),
        (
            "# R32 (release), REVISION: 7.1, GID: 29818004, BOARD: t210ref, EABI: aarch64, "
            "DATE: Sat Feb 19 17:05:08 UTC 2022\n",
            "32.7.1",
        ),
        (
            "# R36 (release), REVISION: 4.0, GID: 37537400, BOARD: generic, EABI: aarch64\n",
            "36.4.0",
        ),
        ("not a release file\n", None),
        ("", None),
    ],
)
def test_parse_nv_tegra_release(text: str, expected: str | None) -> None:
    assert parse_nv_tegra_release(text) == expected


def test_parse_device_tree_model() -> None:
    raw = b"NVIDIA Jetson Orin Nano Developer Kit\x00"
    assert parse_device_tree_model(raw) == "NVIDIA Jetson Orin Nano Developer Kit"
    assert parse_device_tree_model(b"\x00") is None
    assert parse_device_tree_model(b"") is None


@pytest.mark.parametrize(
    ("raw", "expected"), [(13000, "13.0"), (12040, "12.4"), (11080, "11.8"), (12090, "12.9")]
)
def test_format_cuda_version(raw: int, expected: str) -> None:
    assert format_cuda_version(raw) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            ORIN_NANO,
            GpuSample(
                index=0,
                utilization_percent=37.0,
                memory_used_bytes=2345 * MIB,
                temperature_c=40.0,
                power_w=0.987,
            ),
        ),
        (
            NANO,
            GpuSample(
                index=0,
                utilization_percent=0.0,
                memory_used_bytes=1540 * MIB,
                temperature_c=36.0,
                power_w=0.125,
            ),
        ),
        (
            XAVIER,
            GpuSample(
                index=0,
                utilization_percent=99.0,
                memory_used_bytes=3123 * MIB,
                temperature_c=38.5,
                power_w=8.544,
            ),
        ),
        (
            ORIN_IDLE,
            GpuSample(
                index=0,
                utilization_percent=0.0,
                memory_used_bytes=3050 * MIB,
                temperature_c=None,
                power_w=0.479,
            ),
        ),
        (
            AGX_ORIN,
            GpuSample(
                index=0,
                utilization_percent=81.0,
                memory_used_bytes=9152 * MIB,
                temperature_c=55.2,
                power_w=7.788,
            ),
        ),
    ],
    ids=["orin-nano", "nano-l4t32", "xavier", "orin-idle", "agx-orin"],
)
def test_parse_tegrastats(line: str, expected: GpuSample) -> None:
    assert parse_tegrastats(line) == expected


def test_parse_tegrastats_without_gpu_fields() -> None:
    sample = parse_tegrastats("GR3D_FREQ @[305,305] cpu@40C")
    assert sample == GpuSample(index=0)


@pytest.mark.parametrize("line", ["", "hello world", "CPU [12%@1510] cpu@41.5C"])
def test_parse_tegrastats_rejects_other_lines(line: str) -> None:
    assert parse_tegrastats(line) is None


def test_parse_tegrastats_ram_units() -> None:
    assert parse_tegrastats_ram(ORIN_NANO) == (2345 * MIB, 7764 * MIB)
    assert parse_tegrastats_ram("RAM 1024/4096kB (lfb 1x4MB)") == (1024 * 1024, 4096 * 1024)
    assert parse_tegrastats_ram("SWAP 0/3882MB") is None


def test_parse_jtop_stats() -> None:
    stats = {
        "time": "2025-11-21 15:44:01",
        "uptime": 12345.0,
        "CPU1": 12,
        "GPU": 37.5,
        "Temp cpu": 41.5,
        "Temp gpu": 40.25,
        "Power VDD_CPU_GPU_CV": 987,
        "Power TOT": 4321,
    }
    sample = parse_jtop_stats(stats, {"tot": 7_950_016, "used": 2_345_000})
    assert sample == GpuSample(
        index=0,
        utilization_percent=37.5,
        memory_used_bytes=2_345_000 * 1024,
        temperature_c=40.25,
        power_w=0.987,
    )


def test_parse_jtop_stats_sensor_off_and_missing() -> None:
    assert parse_jtop_stats({"GPU": 0, "Temp GPU": "OFF"}) == GpuSample(
        index=0, utilization_percent=0.0
    )
    assert parse_jtop_stats({"GPU": 5, "Temp gpu": -256}) == GpuSample(
        index=0, utilization_percent=5.0
    )
    assert parse_jtop_stats({"CPU1": 3, "Power TOT": 4000}) is None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def no_gpu_libs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynvml and jtop unimportable, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "jtop", None)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder first on PATH, for fake tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir


@pytest.fixture
def jetson_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GID: 38968081, BOARD: generic, EABI: aarch64\n"
    )
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (root / "proc/cpuinfo").write_text(
        ARM64_CPUINFO + "model name\t: ARMv8 Processor rev 1 (v8l)\n"
    )
    return root


# --------------------------------------------------------------------------- I/O shell


@pytest.mark.integration  # runs the fake tegrastats as a subprocess
def test_read_tegrastats_line_stops_the_tool(fake_bin: Path) -> None:
    # The real tool never exits; the fake idles the same way until it is stopped.
    fake_tegrastats(fake_bin, f'echo "{ORIN_NANO}"\nexec tail -f /dev/null')
    assert read_tegrastats_line() == ORIN_NANO


@pytest.mark.integration  # runs the fake tegrastats as a subprocess
def test_read_tegrastats_line_absent_or_silent(fake_bin: Path) -> None:
    assert read_tegrastats_line() is None  # not on PATH
    fake_tegrastats(fake_bin, "exit 1")
    assert read_tegrastats_line() is None


def test_probe_device_on_this_machine() -> None:
    report = probe_device()
    assert isinstance(report, DeviceReport)
    assert report.cpu_logical_cores >= 1
    assert 1 <= report.cpu_physical_cores <= report.cpu_logical_cores
    assert report.ram_total_bytes > 0
    assert 0 < report.ram_available_bytes <= report.ram_total_bytes
    assert report.arch == platform.machine()
    assert report.runtimes["python"] == platform.python_version()
    assert report.probed_at.utcoffset() == UTC.utcoffset(None)
    assert report.is_jetson is False
    assert report.l4t_version is None
    if not Path("/dev/nvidiactl").exists():
        assert report.gpus == []
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        assert report.cpu_model
    if importlib.util.find_spec("llama_cpp") is not None:
        assert report.runtimes["llama_cpp"]
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "CPUExecutionProvider" in report.runtimes["onnxruntime_providers"].split(",")


def test_probe_runtimes_without_optional_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    runtimes, offload = probe_runtimes()
    assert offload is False
    assert "python" in runtimes
    assert not {"llama_cpp", "onnxruntime", "onnxruntime_providers"} & runtimes.keys()


def test_probe_device_with_empty_root_and_no_gpu_libraries(
    tmp_path: Path, no_gpu_libs: None, fake_bin: Path
) -> None:
    report = probe_device(root=tmp_path)
    assert report.is_jetson is False
    assert report.jetson_model is None
    assert report.gpus == []
    assert report.cpu_model == (platform.processor() or None)


def test_probe_device_reads_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    report = probe_device(root=tmp_path)
    assert [g.name for g in report.gpus] == ["NVIDIA RTX 4000 Ada Generation", "NVIDIA L4"]
    gpu = report.gpus[0]
    assert gpu.index == 0
    assert gpu.source == "nvml"
    assert gpu.memory_total_bytes == 20 * 2**30
    assert gpu.memory_used_bytes == 3 * 2**30
    assert gpu.utilization_percent == 42.0
    assert gpu.temperature_c == 51.0
    assert gpu.power_w == pytest.approx(123.456)
    assert gpu.driver_version == "580.82.07"
    assert gpu.cuda_version == "13.0"
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_probe_device_keeps_a_gpu_whose_field_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml = FakeNvml(fail_temperature=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    report = probe_device(root=tmp_path)
    assert len(report.gpus) == 2
    assert report.gpus[0].temperature_c is None
    assert report.gpus[0].power_w == pytest.approx(123.456)
    assert nvml.shutdowns == 1


def test_probe_device_when_nvml_fails_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml = FakeNvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    report = probe_device(root=tmp_path)
    assert report.gpus == []
    assert nvml.shutdowns == 0  # nothing to shut down


@pytest.mark.integration  # runs the fake tegrastats as a subprocess
def test_probe_device_on_a_jetson_with_tegrastats(
    jetson_root: Path, fake_bin: Path, no_gpu_libs: None
) -> None:
    fake_tegrastats(fake_bin, f'echo "{ORIN_NANO}"\nexec tail -f /dev/null')
    report = probe_device(root=jetson_root)
    assert report.is_jetson is True
    assert report.l4t_version == "36.4.3"
    assert report.jetson_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report.cpu_model == "ARMv8 Processor rev 1 (v8l)"
    [gpu] = report.gpus
    assert gpu.source == "tegrastats"
    assert gpu.name == "NVIDIA Jetson Orin Nano Developer Kit"
    assert gpu.memory_total_bytes == 7764 * MIB
    assert gpu.memory_used_bytes == 2345 * MIB
    assert gpu.utilization_percent == 37.0
    assert gpu.temperature_c == 40.0


def test_probe_device_on_a_jetson_prefers_jtop(
    jetson_root: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    clients: list[FakeJtop] = []

    def make() -> FakeJtop:
        clients.append(FakeJtop())
        return clients[-1]

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=make))
    fake_tegrastats(fake_bin, "exit 1")  # would give nothing: jtop must be the source
    report = probe_device(root=jetson_root)
    [gpu] = report.gpus
    assert gpu.source == "jtop"
    assert gpu.utilization_percent == 12.0
    assert gpu.power_w == 2.5
    assert gpu.memory_used_bytes == 1_000_000 * 1024
    assert [c.closed for c in clients] == [True]


@pytest.mark.integration  # runs the fake tegrastats as a subprocess
def test_probe_device_on_a_jetson_falls_back_when_jtop_service_is_down(
    jetson_root: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(FakeJtop, "fail_start", True)
    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=FakeJtop))
    fake_tegrastats(fake_bin, f'echo "{XAVIER}"')
    [gpu] = probe_device(root=jetson_root).gpus
    assert gpu.source == "tegrastats"
    assert gpu.utilization_percent == 99.0


def test_probe_device_on_a_jetson_without_any_gpu_source(
    jetson_root: Path, fake_bin: Path, no_gpu_libs: None
) -> None:
    report = probe_device(root=jetson_root)
    assert report.is_jetson is True
    assert report.gpus == []


# --------------------------------------------------------------------------- sampler


def test_sampler_initialises_nvml_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(root=tmp_path) as sampler:
        first = sampler.sample()
        second = sampler.sample()
        assert sampler.backend == "nvml"
        assert nvml.inits == 1
        assert nvml.shutdowns == 0
    assert nvml.shutdowns == 1
    assert first == second
    assert [s.index for s in first] == [0, 1]
    assert first[0] == GpuSample(
        index=0,
        utilization_percent=42.0,
        memory_used_bytes=3 * 2**30,
        temperature_c=51.0,
        power_w=123.456,
    )


def test_sampler_reopens_after_close(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuSampler(root=tmp_path)
    sampler.sample()
    sampler.close()
    sampler.close()  # idempotent
    assert len(sampler.sample()) == 2
    sampler.close()
    assert (nvml.inits, nvml.shutdowns) == (2, 2)


def test_sampler_remembers_that_there_is_no_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_bin: Path
) -> None:
    nvml = FakeNvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "jtop", None)
    with GpuSampler(root=tmp_path) as sampler:
        assert sampler.backend is None
        assert sampler.sample() == []
        assert sampler.sample() == []
        assert sampler.backend == "none"
    assert nvml.init_calls == 1


@pytest.mark.integration  # runs the fake tegrastats as a subprocess
def test_sampler_on_a_jetson_uses_tegrastats(
    jetson_root: Path, fake_bin: Path, no_gpu_libs: None
) -> None:
    fake_tegrastats(fake_bin, f'echo "{NANO}"\nexec tail -f /dev/null')
    with GpuSampler(root=jetson_root) as sampler:
        [reading] = sampler.sample()
        assert sampler.backend == "tegrastats"
    assert reading.temperature_c == 36.0
    assert reading.memory_used_bytes == 1540 * MIB


def test_sampler_on_a_jetson_keeps_one_jtop_client(
    jetson_root: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    clients: list[FakeJtop] = []

    def make() -> FakeJtop:
        clients.append(FakeJtop())
        return clients[-1]

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=make))
    with GpuSampler(root=jetson_root) as sampler:
        assert sampler.sample()[0].utilization_percent == 12.0
        assert sampler.sample()[0].temperature_c == 44.0
        assert sampler.backend == "jtop"
    assert [c.closed for c in clients] == [True]


def test_sample_gpus_without_any_gpu(no_gpu_libs: None, fake_bin: Path) -> None:
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this machine is a Jetson")
    assert sample_gpus() == []


# --------------------------------------------------------------------------- compute capability


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("NVIDIA Jetson Orin Nano Developer Kit", "8.7"),  # an Orin before the first Nano
        ("NVIDIA Jetson AGX Orin Developer Kit", "8.7"),
        ("NVIDIA Orin NX Developer Kit", "8.7"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "7.2"),
        ("Jetson-AGX", "7.2"),  # AGX Xavier's device tree
        ("NVIDIA Jetson TX2", "6.2"),
        ("NVIDIA Jetson TX1", "5.3"),
        ("NVIDIA Jetson Nano Developer Kit", "5.3"),
        ("NVIDIA Jetson AGX Thor Developer Kit", "11.0"),
        ("Raspberry Pi 4 Model B Rev 1.4", None),
        (None, None),
    ],
)
def test_jetson_compute_capability(model: str | None, expected: str | None) -> None:
    assert jetson_compute_capability(model) == expected


class NvmlWithComputeCapability(FakeNvml):
    """A pynvml that knows nvmlDeviceGetCudaComputeCapability: 8.9, and an error for GPU 1."""

    def nvmlDeviceGetCudaComputeCapability(self, handle: str) -> tuple[int, int]:
        if handle == "handle-1":
            raise self.NVMLError("Not Supported")
        return (8, 9)


def test_probe_device_reads_the_compute_capability_from_nvml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", NvmlWithComputeCapability())
    report = probe_device(root=tmp_path)
    assert [g.compute_capability for g in report.gpus] == ["8.9", None]


def test_an_older_pynvml_without_the_call_reports_no_compute_capability(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert not hasattr(FakeNvml(), "nvmlDeviceGetCudaComputeCapability")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert [g.compute_capability for g in probe_device(root=tmp_path).gpus] == [None, None]


def test_on_a_jetson_the_board_names_the_compute_capability_nvml_cannot(
    jetson_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", NvmlWithComputeCapability())
    report = probe_device(root=jetson_root)
    assert [g.compute_capability for g in report.gpus] == ["8.9", "8.7"]  # NVML first


def test_on_a_jetson_with_jtop_the_board_names_the_compute_capability(
    jetson_root: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=FakeJtop))
    [gpu] = probe_device(root=jetson_root).gpus
    assert (gpu.source, gpu.compute_capability) == ("jtop", "8.7")


@pytest.mark.parametrize(
    ("target", "zone"),
    [
        ("/usr/share/zoneinfo/Europe/Berlin", "Europe/Berlin"),
        ("../usr/share/zoneinfo/America/New_York", "America/New_York"),
        ("/usr/share/zoneinfo/posix/Asia/Tokyo", "Asia/Tokyo"),
        ("/usr/share/zoneinfo/", None),
        ("/etc/somewhere-else", None),
        ("", None),
    ],
)
def test_the_time_zone_comes_from_the_localtime_link(target: str, zone: str | None) -> None:
    assert agent.probe.zone_from_localtime(target) == zone


def test_local_zone_reads_the_link_then_etc_timezone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TZ", raising=False)
    (tmp_path / "etc").mkdir()
    assert agent.probe.local_zone(tmp_path) is None
    (tmp_path / "etc/timezone").write_text("Europe/Lisbon\n")
    assert agent.probe.local_zone(tmp_path) == "Europe/Lisbon"
    (tmp_path / "etc/localtime").symlink_to("/usr/share/zoneinfo/Africa/Nairobi")
    assert agent.probe.local_zone(tmp_path) == "Africa/Nairobi"
    monkeypatch.setenv("TZ", ":Pacific/Auckland")
    assert agent.probe.local_zone(tmp_path) == "Pacific/Auckland"


# --------------------------------------------------------------------------- throttling


class NvmlWithClockEvents(FakeNvml):
    """A current pynvml: clock event reasons per GPU handle (an error where none is given)."""

    def __init__(self, reasons: dict[str, int]) -> None:
        super().__init__()
        self.reasons = reasons

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        if handle not in self.reasons:
            raise self.NVMLError("Not Supported")
        return self.reasons[handle]


class NvmlWithThrottleReasons(FakeNvml):
    """An older pynvml that only has the deprecated ...ThrottleReasons name."""

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        return 0x20 if handle == "handle-0" else 0


def _sample_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> list[bool | None]:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(root=tmp_path) as sampler:
        return [s.throttled for s in sampler.sample()]


def test_nvml_thermal_slowdown_reads_as_throttled_and_idle_does_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml = NvmlWithClockEvents({"handle-0": 0x40 | 0x01, "handle-1": 0x01})  # HW thermal; idle
    assert _sample_with(monkeypatch, tmp_path, nvml) == [True, False]


def test_an_older_pynvml_reports_throttling_under_the_old_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _sample_with(monkeypatch, tmp_path, NvmlWithThrottleReasons()) == [True, False]


def test_throttling_is_unknown_when_nvml_cannot_say(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml = NvmlWithClockEvents({"handle-1": 0x04})  # GPU 0: "Not Supported"
    assert _sample_with(monkeypatch, tmp_path, nvml) == [None, True]
    assert _sample_with(monkeypatch, tmp_path, FakeNvml()) == [None, None]  # no such call


@pytest.mark.parametrize(
    ("reasons", "throttled"),
    [
        (0x04, True),  # SW power cap
        (0x08, True),  # HW slowdown
        (0x20, True),  # SW thermal slowdown
        (0x40, True),  # HW thermal slowdown
        (0x80, True),  # HW power brake
        (0x00, False),
        (0x01, False),  # GPU idle
        (0x02, False),  # application clocks setting
        (0x10, False),  # sync boost
        (0x100, False),  # display clock setting
        (0x01 | 0x02 | 0x10 | 0x100, False),
    ],
)
def test_which_clock_event_reasons_are_throttling(
    reasons: int, throttled: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml = NvmlWithClockEvents({"handle-0": reasons, "handle-1": reasons})
    assert _sample_with(monkeypatch, tmp_path, nvml) == [throttled, throttled]


def test_the_throttle_bits_are_the_installed_pynvml_names() -> None:
    pynvml = pytest.importorskip("pynvml")  # importing needs no driver; nvmlInit would
    names = ("SwPowerCap", "HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown")
    expected = 0
    for name in (*names, "HwPowerBrakeSlowdown"):
        assert getattr(pynvml, f"nvmlClocksEventReason{name}") == getattr(
            pynvml, f"nvmlClocksThrottleReason{name}"
        )
        expected |= getattr(pynvml, f"nvmlClocksEventReason{name}")
    assert expected == agent.probe.NVML_THROTTLE_REASONS


def test_jetson_sources_do_not_report_throttling() -> None:
    sample = parse_tegrastats(ORIN_NANO)
    assert sample is not None
    assert sample.throttled is None
    jtop_sample = parse_jtop_stats({"GPU": 99, "Temp gpu": 96.0})
    assert jtop_sample is not None
    assert jtop_sample.throttled is None
