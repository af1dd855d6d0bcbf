"""Per-device variant choice (fleet.registry.variants): the matrix, the order, the fit rules."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import fleet.registry.variants as variants
from fleet.api.schemas import ModelMetadata
from fleet.registry.variants import (
    HEADROOM_PERCENT,
    QUALITY,
    UNKNOWN_QUALITY,
    Candidate,
    Chosen,
    Ineligible,
    VariantRequirements,
    candidate_of,
    choose_variant,
    fits,
    normalise_arch,
    quality_of,
)
from models.device import DeviceReport, GpuInfo

GiB = 2**30
MiB = 2**20
DOCS = Path(__file__).resolve().parents[2] / "docs" / "variants.md"


@dataclass
class Row:
    """A registry row as the choice reads it (fleet.tables.ModelArtifact)."""

    variant: str
    meta: dict[str, Any]
    format: str = "gguf"
    size_bytes: int = 0
    yanked_at: datetime | None = None
    yank_reason: str = ""


def row(variant: str, size: float, **metadata: Any) -> Row:
    meta = ModelMetadata.model_validate(metadata).model_dump(mode="json")
    return Row(variant=variant, meta=meta, size_bytes=int(size * GiB))


# A 1B-ish model, as an uploader would describe it: the headroom is the fleet's to add.
ONE_B = [
    row(
        "F32",
        4.6,
        quantization="F32",
        vram_bytes=int(4.8 * GiB),
        ram_bytes=int(5.2 * GiB),
        requirements={"gpu": "required", "min_compute_capability": "8.0"},
    ),
    row("F16", 2.5, quantization="F16", ram_bytes=3 * GiB, vram_bytes=int(2.6 * GiB)),
    row("Q8_0", 1.3, quantization="Q8_0", ram_bytes=int(1.9 * GiB), vram_bytes=int(1.4 * GiB)),
    row(
        "Q6_K-x86",
        1.0,
        quantization="Q6_K",
        ram_bytes=int(1.5 * GiB),
        vram_bytes=int(1.2 * GiB),
        requirements={"arch": ["amd64"]},  # spelled as Windows and Debian do
    ),
    row("Q4_K_M", 0.8, quantization="Q4_K_M", ram_bytes=1 * GiB, vram_bytes=int(0.9 * GiB)),
]
CANDIDATES = [candidate_of(r) for r in ONE_B]


def device(
    arch: str = "x86_64",
    ram: float = 8,
    *,
    gpu: float | None = None,
    cc: str | None = None,
    offload: bool = True,
    jetson: str | None = None,
    l4t: str | None = None,
    runtimes: dict[str, str] | None = None,
) -> DeviceReport:
    """A device with ``ram`` GiB, and a GPU with ``gpu`` GiB (on a Jetson: the shared RAM)."""
    ram_bytes = int(ram * GiB)
    gpus = []
    if gpu is not None:
        gpus.append(
            GpuInfo(
                index=0,
                name=jetson or "NVIDIA GeForce",
                memory_total_bytes=int(gpu * GiB),
                compute_capability=cc,
                source="tegrastats" if jetson else "nvml",
            )
        )
    return DeviceReport(
        hostname="d",
        os="Linux",
        kernel="6.8",
        arch=arch,
        cpu_physical_cores=4,
        cpu_logical_cores=4,
        ram_total_bytes=ram_bytes,
        ram_available_bytes=ram_bytes // 2,
        is_jetson=jetson is not None,
        jetson_model=jetson,
        l4t_version=l4t,
        gpus=gpus,
        runtimes={"python": "3.11.7", "llama_cpp": "0.3.36", **(runtimes or {})},
        llama_gpu_offload=offload and gpu is not None,
    )


def orin(
    shared: float, cc: str | None = "8.7", l4t: str = "36.4.3", board: str = "Jetson Orin Nano"
) -> DeviceReport:
    """A Jetson whose GPU shares ``shared`` GiB with its CPU."""
    return device("aarch64", shared, gpu=shared, cc=cc, jetson=f"NVIDIA {board}", l4t=l4t)


def pick(device_report: DeviceReport | None, candidates: list[Candidate] = CANDIDATES) -> Any:
    choice = choose_variant(candidates, device_report)
    return (choice.variant, choice.placement) if isinstance(choice, Chosen) else choice


# --------------------------------------------------------------------------- the matrix

MATRIX = {
    # CPU only: the best variant whose RAM (plus 10%) fits; F32 needs a GPU.
    "x86_64 2 GB": (device("x86_64", 2), ("Q6_K-x86", "cpu")),
    "aarch64 2 GB": (device("aarch64", 2), ("Q4_K_M", "cpu")),
    "x86_64 4 GB": (device("x86_64", 4), ("F16", "cpu")),
    "aarch64 4 GB": (device("aarch64", 4), ("F16", "cpu")),
    "x86_64 8 GB": (device("x86_64", 8), ("F16", "cpu")),
    "aarch64 8 GB": (device("aarch64", 8), ("F16", "cpu")),
    "x86_64 16 GB": (device("x86_64", 16), ("F16", "cpu")),
    "aarch64 16 GB": (device("aarch64", 16), ("F16", "cpu")),
    # Discrete NVIDIA GPUs on x86_64.
    "16 GB + RTX 8 GB cc 8.6": (device(ram=16, gpu=8, cc="8.6"), ("F32", "gpu")),
    "8 GB + GTX 4 GB cc 7.5": (device(ram=8, gpu=4, cc="7.5"), ("F16", "gpu")),
    "16 GB + RTX 8 GB, llama.cpp without GPU": (
        device(ram=16, gpu=8, cc="8.6", offload=False),
        ("F16", "cpu"),
    ),
    "4 GB + GT 2 GB cc 6.1": (device(ram=4, gpu=2, cc="6.1"), ("F16", "cpu")),
    "2 GB + GT 2 GB cc 6.1": (device(ram=2, gpu=2, cc="6.1"), ("Q8_0", "gpu")),
    # Jetsons: the GPU shares the RAM.
    "Orin Nano 8 GB": (orin(7764 / 1024), ("F32", "gpu")),
    "Orin Nano 4 GB": (orin(3.4), ("F16", "gpu")),
    "Orin NX 16 GB": (orin(15.3), ("F32", "gpu")),
    "Orin 8 GB without compute capability": (orin(7.6, cc=None), ("F16", "gpu")),
    "Xavier NX 8 GB cc 7.2": (
        orin(7.6, cc="7.2", l4t="35.4.1", board="Jetson Xavier NX"),
        ("F16", "gpu"),
    ),
    "Nano 2 GB cc 5.3": (orin(1.9, cc="5.3", l4t="32.7.4", board="Jetson Nano"), ("Q8_0", "gpu")),
}


@pytest.mark.parametrize(("report", "expected"), MATRIX.values(), ids=MATRIX.keys())
def test_matrix_picks(report: DeviceReport, expected: tuple[str, str]) -> None:
    assert pick(report) == expected


def test_matrix_ineligible_device_gets_every_reason_best_first() -> None:
    choice = choose_variant(CANDIDATES, device("aarch64", 1))
    assert isinstance(choice, Ineligible)
    assert choice.reasons == {
        "F32": "needs a GPU: the device has no GPU",
        "F16": "needs 3.3 GiB of RAM with 10% headroom, the device has 1.0 GiB",
        "Q8_0": "needs 2.1 GiB of RAM with 10% headroom, the device has 1.0 GiB",
        "Q6_K-x86": "built for x86_64, the device is aarch64",
        "Q4_K_M": "needs 1.1 GiB of RAM with 10% headroom, the device has 1.0 GiB",
    }
    assert choice.summary.startswith("no variant fits this device: F32: needs a GPU")
    assert "; Q4_K_M: needs 1.1 GiB" in choice.summary


def test_a_chosen_variant_says_why_and_which_better_ones_do_not_fit() -> None:
    choice = choose_variant(CANDIDATES, device(ram=8, gpu=4, cc="7.5"))
    assert isinstance(choice, Chosen)
    assert (choice.variant, choice.placement, choice.quality) == ("F16", "gpu", 900)
    assert choice.reason == (
        "F16 (quality 900) on the GPU (NVIDIA GeForce): needs 2.9 GiB of 4.0 GiB VRAM"
        "; better variants do not fit: F32: needs a GPU: NVIDIA GeForce: needs 5.3 GiB of"
        " VRAM with 10% headroom, has 4.0 GiB and needs compute capability 8.0, has 7.5"
    )


def test_a_gpu_device_falls_back_to_the_cpu_and_says_why() -> None:
    choice = choose_variant(CANDIDATES, device(ram=4, gpu=2, cc="6.1"))
    assert isinstance(choice, Chosen)
    assert choice.reason.startswith(
        "F16 (quality 900) on the CPU: needs 3.3 GiB of 4.0 GiB RAM (not on the GPU:"
        " NVIDIA GeForce: needs 2.9 GiB of VRAM with 10% headroom, has 2.0 GiB)"
    )


def test_on_a_jetson_the_gpu_memory_is_called_shared() -> None:
    choice = choose_variant(CANDIDATES, orin(3.4))
    assert isinstance(choice, Chosen)
    assert "needs 2.9 GiB of 3.4 GiB shared memory" in choice.reason
    assert "needs 5.3 GiB of shared memory with 10% headroom, has 3.4 GiB" in choice.reason


RAM_STEPS = [0.5 * i for i in range(1, 65)]  # 0.5 to 32 GiB


def _quality(choice: Chosen | Ineligible) -> int:
    return choice.quality if isinstance(choice, Chosen) else -1


@pytest.mark.parametrize(("report", "expected"), MATRIX.values(), ids=MATRIX.keys())
def test_more_ram_never_makes_the_pick_worse(report: DeviceReport, expected: object) -> None:
    previous = -1
    for ram in RAM_STEPS:
        grown = report.model_copy(update={"ram_total_bytes": int(ram * GiB)})
        if report.is_jetson:  # the GPU's memory is the same RAM
            gpus = [
                g.model_copy(update={"memory_total_bytes": int(ram * GiB)}) for g in report.gpus
            ]
            grown = grown.model_copy(update={"gpus": gpus})
        quality = _quality(choose_variant(CANDIDATES, grown))
        assert quality >= previous, f"{ram} GiB picks worse than {ram - 0.5} GiB"
        previous = quality


@pytest.mark.parametrize("ram", [2, 4, 8])
def test_more_vram_never_makes_the_pick_worse(ram: int) -> None:
    previous = -1
    for vram in RAM_STEPS:
        quality = _quality(choose_variant(CANDIDATES, device(ram=ram, gpu=vram, cc="8.6")))
        assert quality >= previous, f"{vram} GiB of VRAM picks worse than {vram - 0.5} GiB"
        previous = quality


def test_a_gpu_never_makes_the_pick_worse_than_the_same_box_without_one() -> None:
    for ram in RAM_STEPS:
        for gpu in (1, 2, 4, 8):
            without = _quality(choose_variant(CANDIDATES, device(ram=ram)))
            with_gpu = _quality(choose_variant(CANDIDATES, device(ram=ram, gpu=gpu, cc="8.6")))
            assert with_gpu >= without, (ram, gpu)


# --------------------------------------------------------------------------- the order


def _stated_order() -> list[list[str]]:
    """The order docs/variants.md states: ``A = B > C > ...``, best first."""
    match = re.search(r"```text\n\s*(F32 .*?)\n\s*```", DOCS.read_text(), re.DOTALL)
    assert match, "docs/variants.md states the quality order in a text block"
    line = " ".join(match.group(1).split())
    return [[name.strip() for name in group.split("=")] for group in line.split(">")]


def test_the_documented_order_is_the_table() -> None:
    groups = _stated_order()
    assert sorted(n for g in groups for n in g) == sorted(QUALITY)
    ranks = [{QUALITY[n] for n in group} for group in groups]
    assert all(len(r) == 1 for r in ranks), "names in one group rank the same"
    flat = [r.pop() for r in ranks]
    assert flat == sorted(flat, reverse=True)
    assert len(set(flat)) == len(flat)
    assert min(flat) > UNKNOWN_QUALITY


def test_the_choice_follows_the_stated_order() -> None:
    groups = _stated_order()
    names = [group[0] for group in groups] + ["awq"]  # unknown: last, still chosen
    left = [Candidate(variant=n.lower(), quality=quality_of(n.lower())) for n in names]
    chosen = []
    while left:
        choice = choose_variant(left, device())
        assert isinstance(choice, Chosen)
        chosen.append(choice.variant)
        left = [c for c in left if c.variant != choice.variant]
    assert chosen == [n.lower() for n in names]


@pytest.mark.parametrize(
    ("variant", "quantization", "quality", "expected"),
    [
        ("Q4_K_M", None, None, 550),
        ("q4_k_m", None, None, 550),  # any case
        ("default", "Q8_0", None, 800),  # "default" ranks by its quantization
        ("default", None, None, UNKNOWN_QUALITY),
        ("Q4_K_M-aarch64", None, None, 550),  # a known part of the name
        ("model.int8", None, None, 800),
        ("int8", "awq", None, 800),  # an unknown quantization falls back to the name
        ("awq", "awq", None, UNKNOWN_QUALITY),
        ("Q4_K_M", "Q4_K_M", 950, 950),  # explicit quality wins
        ("Q4_K_M", "Q4_K_M", 0, 0),
        ("fp16", None, None, 900),
        ("BF16", None, None, 900),
    ],
)
def test_quality_of(
    variant: str, quantization: str | None, quality: int | None, expected: int
) -> None:
    assert quality_of(variant, quantization, quality) == expected


def test_explicit_quality_in_the_metadata_overrides_the_quantization() -> None:
    rows = [*ONE_B, row("Q4_K_M-imatrix", 0.8, quantization="Q4_K_M", quality=950)]
    assert pick(device(ram=16), [candidate_of(r) for r in rows]) == ("Q4_K_M-imatrix", "cpu")


def test_ties_prefer_the_gpu_then_the_smaller_file_then_the_name() -> None:
    on_cpu = Candidate("a-cpu", 550, size_bytes=1, requirements=VariantRequirements(gpu="none"))
    on_gpu = Candidate("b-gpu", 550, size_bytes=9, vram_bytes=GiB)
    assert pick(device(ram=8, gpu=8, cc="8.6"), [on_cpu, on_gpu]) == ("b-gpu", "gpu")
    assert pick(device(ram=8), [on_cpu, on_gpu]) == ("a-cpu", "cpu")  # no GPU: smaller wins
    small, large = Candidate("z", 550, size_bytes=1), Candidate("a", 550, size_bytes=2)
    assert pick(device(), [large, small]) == ("z", "cpu")
    assert pick(device(), [Candidate("b", 550), Candidate("a", 550)]) == ("a", "cpu")
    assert pick(device(), [Candidate("b", 550), Candidate("a", 540)]) == ("b", "cpu")


# --------------------------------------------------------------------------- the fit rules


def test_headroom_is_ten_percent_rounded_up() -> None:
    assert HEADROOM_PERCENT == 10
    need = 1_000_000_001  # + 100_000_000.1 -> 1_100_000_002
    candidate = Candidate("c", 1, ram_bytes=need)

    def with_ram(n: int) -> DeviceReport:
        return device().model_copy(update={"ram_total_bytes": n})

    assert fits(candidate, with_ram(1_100_000_002)) is None
    assert fits(candidate, with_ram(1_100_000_001)) == (
        "needs 1.0 GiB of RAM with 10% headroom, the device has 1.0 GiB"
    )
    gpu = Candidate("g", 1, vram_bytes=1000 * MiB, requirements=VariantRequirements(gpu="required"))
    assert fits(gpu, device(gpu=1100 / 1024)) is None
    assert fits(gpu, device(gpu=1099 / 1024)) is not None


@pytest.mark.parametrize(
    ("device_arch", "wanted", "fits_it"),
    [
        ("aarch64", ["aarch64"], True),
        ("arm64", ["aarch64"], True),  # macOS and Debian say arm64
        ("aarch64", ["ARM64"], True),
        ("AMD64", ["x86_64"], True),  # Windows says AMD64
        ("x86_64", ["aarch64"], False),
        ("x86_64", ["aarch64", "x86_64"], True),
        ("riscv64", [], True),  # empty: any
    ],
)
def test_arch(device_arch: str, wanted: list[str], fits_it: bool) -> None:
    candidate = Candidate("c", 1, requirements=VariantRequirements.model_validate({"arch": wanted}))
    assert (fits(candidate, device(device_arch)) is None) == fits_it


def test_normalise_arch() -> None:
    assert [normalise_arch(a) for a in ["arm64", " AMD64", "x64", "aarch64", "riscv64"]] == [
        "aarch64",
        "x86_64",
        "x86_64",
        "aarch64",
        "riscv64",
    ]
    assert VariantRequirements.model_validate({"arch": ["amd64", "x86_64"]}).arch == ("x86_64",)


def test_min_l4t_is_for_jetsons_only() -> None:
    jetson = Candidate("j", 1, requirements=VariantRequirements(min_l4t="36.0"))
    assert fits(jetson, orin(8, l4t="36.4.3")) is None
    assert fits(jetson, orin(8, l4t="36")) is None
    assert fits(jetson, orin(8, l4t="35.4.1")) == (
        "needs a Jetson with L4T 36.0 or later, the device has L4T 35.4.1"
    )
    assert fits(jetson, device("aarch64", 8, gpu=8, cc="8.7")) == (
        "needs a Jetson with L4T 36.0 or later, the device is not a Jetson"
    )
    no_l4t = orin(8).model_copy(update={"l4t_version": None})
    assert fits(jetson, no_l4t) == (
        "needs a Jetson with L4T 36.0 or later: the device did not report its L4T version"
    )


def test_compute_capability_compares_as_numbers() -> None:
    req = VariantRequirements(gpu="required", min_compute_capability="8.7")
    candidate = Candidate("c", 1, vram_bytes=GiB, requirements=req)
    assert fits(candidate, device(gpu=8, cc="8.7")) is None
    assert fits(candidate, device(gpu=8, cc="10.0")) is None  # not "10.0" < "8.7"
    assert fits(candidate, device(gpu=8, cc="12.0")) is None
    assert fits(candidate, device(gpu=8, cc="8.6")) == (
        "needs a GPU: NVIDIA GeForce: needs compute capability 8.7, has 8.6"
    )
    assert fits(candidate, device(gpu=8, cc=None)) == (
        "needs a GPU: NVIDIA GeForce: did not report its compute capability"
    )


def test_a_preferred_variant_whose_gpu_is_too_old_runs_on_the_cpu() -> None:
    req = VariantRequirements(min_compute_capability="8.0")
    candidate = Candidate("c", 1, ram_bytes=GiB, vram_bytes=GiB, requirements=req)
    assert pick(device(ram=8, gpu=8, cc="7.5"), [candidate]) == ("c", "cpu")
    assert pick(device(ram=8, gpu=8, cc="8.9"), [candidate]) == ("c", "gpu")


def test_the_largest_gpu_that_fits_is_used() -> None:
    small = GpuInfo(
        index=0, name="small", memory_total_bytes=2 * GiB, compute_capability="8.6", source="nvml"
    )
    big = GpuInfo(
        index=1, name="big", memory_total_bytes=24 * GiB, compute_capability="7.0", source="nvml"
    )
    report = device(ram=64, gpu=1).model_copy(update={"gpus": [small, big]})
    old_but_big = Candidate(
        "a", 1, vram_bytes=10 * GiB, requirements=VariantRequirements(gpu="required")
    )
    assert "on the GPU (big)" in _reason(choose_variant([old_but_big], report))
    new_and_small = Candidate(
        "b",
        1,
        vram_bytes=GiB,
        requirements=VariantRequirements(gpu="required", min_compute_capability="8.0"),
    )
    assert "on the GPU (small)" in _reason(choose_variant([new_and_small], report))
    neither = Candidate(
        "c",
        1,
        vram_bytes=10 * GiB,
        requirements=VariantRequirements(gpu="required", min_compute_capability="8.0"),
    )
    assert fits(neither, report) == "needs a GPU: big: needs compute capability 8.0, has 7.0"


def _reason(choice: Chosen | Ineligible) -> str:
    assert isinstance(choice, Chosen), choice
    return choice.reason


def test_runtimes_compare_as_versions_under_one_name() -> None:
    req = VariantRequirements.model_validate({"runtimes": {"llama.cpp": "0.3.10"}})
    assert req.runtimes == {"llama_cpp": "0.3.10"}
    candidate = Candidate("c", 1, requirements=req)
    assert fits(candidate, device(runtimes={"llama_cpp": "0.3.36"})) is None  # 36 > 10
    assert fits(candidate, device(runtimes={"llama_cpp": "0.3.9"})) == (
        "needs llama_cpp 0.3.10 or later, the device has 0.3.9"
    )
    assert fits(candidate, device(runtimes={"llama_cpp": "0.4.0rc1"})) is None
    assert fits(candidate, device(runtimes={"llama_cpp": "dev"})) == (
        "needs llama_cpp 0.3.10 or later, the device has dev"
    )
    no_llama = device().model_copy(update={"runtimes": {"python": "3.11.7"}})
    assert (
        fits(candidate, no_llama) == "needs llama_cpp 0.3.10 or later, the device has no llama_cpp"
    )
    ort = Candidate("o", 1, requirements=VariantRequirements(runtimes={"onnxruntime-gpu": "1.20"}))
    assert fits(ort, device(runtimes={"onnxruntime": "1.31.1+cu12"})) is None


def test_several_refusals_are_all_given() -> None:
    req = VariantRequirements(arch=("x86_64",), runtimes={"onnxruntime": "1.0"})
    assert fits(Candidate("c", 1, requirements=req), device("aarch64")) == (
        "built for x86_64, the device is aarch64; needs onnxruntime 1.0 or later,"
        " the device has no onnxruntime"
    )


def test_gpu_required_never_fits_a_cpu_only_device() -> None:
    req = VariantRequirements(gpu="required")
    candidate = Candidate("c", 1, ram_bytes=1, vram_bytes=1, requirements=req)
    assert fits(candidate, device(ram=64)) == "needs a GPU: the device has no GPU"
    assert fits(candidate, device(ram=64, gpu=8, offload=False)) == (
        "needs a GPU: the device has a GPU but its llama.cpp has no GPU offload"
    )
    assert fits(replace(candidate, vram_bytes=None), device(gpu=8)) is None  # no VRAM stated


def test_gpu_none_runs_on_the_cpu_even_beside_a_gpu() -> None:
    candidate = Candidate("c", 1, vram_bytes=GiB, requirements=VariantRequirements(gpu="none"))
    assert pick(device(gpu=8, cc="8.6"), [candidate]) == ("c", "cpu")


def test_a_preferred_variant_without_vram_runs_on_the_cpu() -> None:
    assert pick(device(gpu=8, cc="8.6"), [Candidate("c", 1, ram_bytes=GiB)]) == ("c", "cpu")


def test_onnx_needs_a_cuda_or_tensorrt_provider_for_the_gpu() -> None:
    candidate = Candidate("fp16", 900, format="onnx", ram_bytes=GiB, vram_bytes=GiB)
    cpu_only = {"onnxruntime": "1.31.1", "onnxruntime_providers": "CPUExecutionProvider"}
    providers = "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider"
    cuda = {"onnxruntime": "1.31.1", "onnxruntime_providers": providers}
    assert pick(device(gpu=8, runtimes=cpu_only), [candidate]) == ("fp16", "cpu")
    assert pick(device(gpu=8, runtimes=cuda, offload=False), [candidate]) == ("fp16", "gpu")
    required = replace(candidate, requirements=VariantRequirements(gpu="required"))
    assert fits(required, device(gpu=8, runtimes=cpu_only)) == (
        "needs a GPU: the device has a GPU but its onnxruntime has no CUDA or TensorRT provider"
    )


# --------------------------------------------------------------------------- unknown facts


def test_a_device_that_has_not_reported_fits_only_what_states_nothing() -> None:
    assert choose_variant(CANDIDATES, None) == Ineligible(
        reasons={
            "F32": "needs a GPU: the device has not reported its hardware",
            "F16": "the device has not reported its hardware",
            "Q8_0": "the device has not reported its hardware",
            "Q6_K-x86": "the device has not reported its hardware",
            "Q4_K_M": "the device has not reported its hardware",
        }
    )
    assert pick(None, [*CANDIDATES, Candidate("plain", 1)]) == ("plain", "cpu")


def test_unreported_ram_and_gpu_memory_fit_nothing_that_states_them() -> None:
    no_ram = device().model_copy(update={"ram_total_bytes": 0})
    assert fits(Candidate("c", 1, ram_bytes=1), no_ram) == "the device did not report its RAM"
    assert fits(Candidate("c", 1), no_ram) is None
    no_vram = device(gpu=0, cc="8.6")
    required = Candidate("g", 1, vram_bytes=1, requirements=VariantRequirements(gpu="required"))
    assert fits(required, no_vram) == "needs a GPU: NVIDIA GeForce: did not report its VRAM"
    jetson_without_gpu = orin(8).model_copy(update={"gpus": []})
    assert fits(required, jetson_without_gpu) == "needs a GPU: the device did not report its GPU"
    no_arch = device().model_copy(update={"arch": ""})
    x86 = Candidate("x", 1, requirements=VariantRequirements(arch=("x86_64",)))
    assert fits(x86, no_arch) == "the device did not report its architecture"


# --------------------------------------------------------------------------- registry rows


def test_candidate_of_a_row() -> None:
    candidate = CANDIDATES[3]
    assert candidate == Candidate(
        variant="Q6_K-x86",
        quality=700,
        size_bytes=int(1.0 * GiB),
        format="gguf",
        ram_bytes=int(1.5 * GiB),
        vram_bytes=int(1.2 * GiB),
        requirements=VariantRequirements(arch=("x86_64",)),
    )


def test_a_row_without_requirements_asks_for_nothing() -> None:
    old = Row(variant="default", meta={"quantization": "Q4_K_M", "card": "# x"}, size_bytes=5)
    assert candidate_of(old) == Candidate("default", 550, size_bytes=5)


def test_a_yanked_row_is_refused_with_its_reason() -> None:
    yanked = replace(ONE_B[1], yanked_at=datetime(2030, 1, 1, tzinfo=UTC), yank_reason="bad output")
    choice = choose_variant([candidate_of(yanked)], device(ram=64))
    assert choice == Ineligible(reasons={"F16": "yanked (bad output)"})
    assert pick(device(ram=64), [candidate_of(yanked), *CANDIDATES[2:]]) == ("Q8_0", "cpu")


def test_a_row_whose_metadata_does_not_validate_is_refused() -> None:
    broken = Row(variant="Q8_0", meta={"requirements": {"gpu": "maybe"}})
    assert fits(candidate_of(broken), device()) == (
        "its metadata does not validate (requirements.gpu: Input should be 'required',"
        " 'preferred' or 'none')"
    )


def test_no_candidates_and_repeated_names() -> None:
    empty = choose_variant([], device())
    assert empty == Ineligible(reasons={})
    assert isinstance(empty, Ineligible)
    assert empty.summary == "no variant to choose from"
    with pytest.raises(ValueError, match="repeat"):
        choose_variant([Candidate("a", 1), Candidate("a", 2)], device())


# --------------------------------------------------------------------------- requirements


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"min_compute_capability": "8"}, "MAJOR.MINOR"),
        ({"min_l4t": "r36"}, "numbers and dots"),
        ({"runtimes": {"llama.cpp": "latest"}}, "runtime llama.cpp: a minimum version"),
        ({"runtimes": {"llama cpp": "1.0"}}, "not a runtime name"),
        ({"arch": ["x86 64"]}, "not an architecture"),
        ({"gpu": "none", "min_compute_capability": "8.0"}, "needs gpu 'required' or 'preferred'"),
        ({"gpu": "maybe"}, "'required', 'preferred' or 'none'"),
        ({"cuda": "12.0"}, "Extra inputs are not permitted"),
    ],
)
def test_requirements_are_validated(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        VariantRequirements.model_validate(body)


def test_requirements_travel_in_the_metadata_header() -> None:
    header = (
        '{"quantization": "Q4_K_M", "quality": 560, "vram_bytes": 1000,'
        ' "requirements": {"arch": ["arm64"], "gpu": "required", "min_l4t": "36.0",'
        ' "runtimes": {"llama-cpp-python": "0.3.0"}}}'
    )
    meta = ModelMetadata.model_validate_json(header)
    assert meta.requirements == VariantRequirements(
        arch=("aarch64",), gpu="required", min_l4t="36.0", runtimes={"llama_cpp": "0.3.0"}
    )
    stored = Row(variant="Q4_K_M", meta=meta.model_dump(mode="json"))
    assert candidate_of(stored).requirements == meta.requirements
    assert candidate_of(stored).quality == 560
    assert ModelMetadata().requirements == VariantRequirements()
    with pytest.raises(ValidationError):
        ModelMetadata.model_validate({"quality": 1001})


def test_public_api() -> None:
    defined = {
        name
        for name, value in vars(variants).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == variants.__name__
    }
    assert defined <= set(variants.__all__)
    assert sorted(variants.__all__) == sorted(
        [
            "HEADROOM_PERCENT",
            "QUALITY",
            "UNKNOWN_QUALITY",
            "Candidate",
            "Chosen",
            "GpuNeed",
            "Ineligible",
            "Placement",
            "VariantRequirements",
            "VariantRow",
            "candidate_of",
            "choose_variant",
            "fits",
            "normalise_arch",
            "quality_of",
        ]
    )
