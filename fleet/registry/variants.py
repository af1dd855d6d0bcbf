"""Which variant of a model version suits a device (pure: variants and a report in, a choice out).

A version may come in several variants: GGUF ``F16``, ``Q8_0``, ``Q4_K_M``; ONNX
``fp32`` or ``int8``; a build per architecture. Each states what it needs
(:class:`VariantRequirements`, with the ``ram_bytes`` and ``vram_bytes`` of its metadata)
and the device says what it has (:class:`models.device.DeviceReport`). :func:`choose_variant`
returns the best variant that fits and where it runs (:class:`Chosen`), or, when none fits,
why each one does not (:class:`Ineligible`). An ineligible device is not a failure (Mender's
"noartifact"): the caller leaves it out and shows the reasons.

Best means, in this order: the highest quality (:data:`QUALITY`, or the metadata's explicit
``quality``); then running on the GPU rather than the CPU; then the smaller file; then the
variant name, so the choice is deterministic.

A variant fits when every one of these holds (:func:`fits` says which does not):

- ``arch`` is empty or names the device's architecture (``arm64`` means ``aarch64``,
  ``amd64`` means ``x86_64``);
- ``min_l4t`` is unset, or the device is a Jetson whose L4T is at least that;
- every runtime in ``runtimes`` is on the device at that version or later;
- and it has a place to run:
  - on the GPU when ``gpu`` is not ``"none"``, the variant states ``vram_bytes`` (or
    ``gpu`` is ``"required"``), the runtime for its format can use an NVIDIA GPU
    (GGUF: llama.cpp built with GPU offload; ONNX: the CUDA or TensorRT provider), and one
    GPU has ``vram_bytes`` plus :data:`HEADROOM_PERCENT` of memory (on a Jetson that is
    the RAM it shares with the CPU) and at least ``min_compute_capability``;
  - else on the CPU, unless ``gpu`` is ``"required"``, when the device's total RAM is at
    least ``ram_bytes`` plus :data:`HEADROOM_PERCENT`.

A requirement the variant does not state is not checked. A fact the device did not report
(no report yet, RAM or GPU memory reported as 0, no compute capability, no L4T version, a
runtime version that is not a number) never satisfies a requirement that needs it: the
variant does not fit, and the reason says which fact is missing. Versions compare as
dotted numbers (``"0.3.36"``, ``"36.4.3"``); a suffix after the numbers (``rc1``,
``+cu12``) is ignored. docs/variants.md has examples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.device import DeviceReport, GpuInfo

__all__ = [
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

GpuNeed = Literal["required", "preferred", "none"]
"""``required``: runs only on a GPU; ``preferred``: on a GPU when it fits, else on the CPU;
``none``: always on the CPU (its ``vram_bytes`` is ignored)."""

Placement = Literal["gpu", "cpu"]

HEADROOM_PERCENT: Final = 10
"""A device needs a variant's ``ram_bytes`` or ``vram_bytes`` plus this much (percent)."""

QUALITY: Final[Mapping[str, int]] = MappingProxyType(
    {
        "F32": 1000,
        "FP32": 1000,
        "F16": 900,
        "BF16": 900,
        "FP16": 900,
        "Q8_0": 800,
        "INT8": 800,
        "UINT8": 800,
        "Q6_K": 700,
        "Q5_K_M": 650,
        "Q5_K_S": 640,
        "Q5_1": 630,
        "Q5_0": 620,
        "Q4_K_M": 550,
        "Q4_K_S": 540,
        "Q4_1": 530,
        "IQ4_NL": 525,
        "IQ4_XS": 520,
        "Q4_0": 510,
        "INT4": 510,
        "Q3_K_L": 450,
        "Q3_K_M": 440,
        "Q3_K_S": 430,
        "Q2_K": 300,
    }
)
"""The rank of each quantization, higher is better; names compare upper-cased."""

UNKNOWN_QUALITY: Final = 0
"""The rank of a name :data:`QUALITY` does not know: lowest, but still a candidate."""

_ARCH_ALIASES: Final = MappingProxyType(
    {"arm64": "aarch64", "armv8": "aarch64", "amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64"}
)
_RUNTIME_ALIASES: Final = MappingProxyType(
    {"llama_cpp_python": "llama_cpp", "llamacpp": "llama_cpp", "onnxruntime_gpu": "onnxruntime"}
)
_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
_VERSION_REQUIREMENT = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")
_COMPUTE_CAPABILITY = re.compile(r"^\d{1,2}\.\d{1,2}$")
_LEADING_VERSION = re.compile(r"\d+(?:\.\d+)*")
_NAME_TOKENS = re.compile(r"[-.+@ ]+")
_GPU_PROVIDERS: Final = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def normalise_arch(arch: str) -> str:
    """``platform.machine()`` spelled one way: lower case, ``arm64`` -> ``aarch64``, ..."""
    name = arch.strip().lower()
    return _ARCH_ALIASES.get(name, name)


def _runtime_name(name: str) -> str:
    key = re.sub(r"[-.]", "_", name.strip().lower())
    return _RUNTIME_ALIASES.get(key, key)


def _version(text: str) -> tuple[int, ...] | None:
    """``"0.3.36"`` -> ``(0, 3, 36)``; ``"1.31.1+cu12"`` -> ``(1, 31, 1)``; None without digits."""
    match = _LEADING_VERSION.match(text.strip())
    return tuple(int(p) for p in match.group().split(".")) if match else None


def _at_least(have: tuple[int, ...], need: tuple[int, ...]) -> bool:
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


class VariantRequirements(BaseModel):
    """What a variant needs beyond memory; every field left unset asks for nothing.

    Memory is stated beside it in the metadata: ``ram_bytes`` (to run on a CPU) and
    ``vram_bytes`` (to run with every layer on a GPU).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: tuple[str, ...] = Field(default=(), max_length=8)  # empty: any ("aarch64", "x86_64")
    gpu: GpuNeed = "preferred"
    min_compute_capability: str | None = None  # e.g. "8.7": the GPU must be at least this
    min_l4t: str | None = None  # e.g. "36.0": Jetsons only, L4T (JetPack) at least this
    runtimes: Mapping[str, str] = Field(default_factory=dict, max_length=16)  # name -> minimum

    @field_validator("arch")
    @classmethod
    def _arch(cls, arch: tuple[str, ...]) -> tuple[str, ...]:
        names = [normalise_arch(a) for a in arch]
        bad = [a for a in names if not _NAME.match(a)]
        if bad:
            raise ValueError(f"not an architecture: {bad[0]!r} (e.g. aarch64, x86_64)")
        return tuple(dict.fromkeys(names))

    @field_validator("min_compute_capability")
    @classmethod
    def _compute_capability(cls, value: str | None) -> str | None:
        if value is not None and not _COMPUTE_CAPABILITY.match(value):
            raise ValueError(f"a compute capability is MAJOR.MINOR, e.g. 8.7, not {value!r}")
        return value

    @field_validator("min_l4t")
    @classmethod
    def _l4t(cls, value: str | None) -> str | None:
        if value is not None and not _VERSION_REQUIREMENT.match(value):
            raise ValueError(f"an L4T version is numbers and dots, e.g. 36.0, not {value!r}")
        return value

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, runtimes: Mapping[str, str]) -> dict[str, str]:
        normalised: dict[str, str] = {}
        for raw, version in runtimes.items():
            name = _runtime_name(raw)
            if not _NAME.match(name):
                raise ValueError(f"not a runtime name: {raw!r} (e.g. llama_cpp, onnxruntime)")
            if not _VERSION_REQUIREMENT.match(version):
                raise ValueError(
                    f"runtime {raw}: a minimum version is numbers and dots, e.g. 0.3.0,"
                    f" not {version!r}"
                )
            normalised[name] = version
        return dict(sorted(normalised.items()))

    @model_validator(mode="after")
    def _gpu_fields(self) -> VariantRequirements:
        if self.gpu == "none" and self.min_compute_capability is not None:
            raise ValueError("min_compute_capability needs gpu 'required' or 'preferred'")
        return self


_NO_REQUIREMENTS: Final = VariantRequirements()


def quality_of(variant: str, quantization: str | None = None, quality: int | None = None) -> int:
    """A variant's rank: ``quality`` when given, else its quantization's, else its name's.

    A name is looked up whole (``"q4_k_m"``), then by its parts split at ``-``, ``.``,
    ``+``, ``@`` or spaces (``"Q4_K_M-aarch64"``); the first part :data:`QUALITY` knows
    wins. Nothing known: :data:`UNKNOWN_QUALITY`.
    """
    if quality is not None:
        return quality
    for name in (quantization, variant):
        if not name:
            continue
        key = name.strip().upper()
        if key in QUALITY:
            return QUALITY[key]
        for part in _NAME_TOKENS.split(key):
            if part in QUALITY:
                return QUALITY[part]
    return UNKNOWN_QUALITY


@dataclass(frozen=True)
class Candidate:
    """One variant as the choice sees it; :func:`candidate_of` builds it from a registry row."""

    variant: str
    quality: int  # quality_of(...): higher is better
    size_bytes: int = 0  # the file; the smaller wins a tie
    format: str = "gguf"  # models.manifest.ModelFormat: which runtime must reach the GPU
    ram_bytes: int | None = None  # to run on a CPU; None: not stated, not checked
    vram_bytes: int | None = None  # to run fully on a GPU; None: not stated
    requirements: VariantRequirements = field(default=_NO_REQUIREMENTS)
    unusable: str | None = None  # why it is never chosen whatever the device (yanked, ...)


class VariantRow(Protocol):
    """What :func:`candidate_of` reads of a registry row (``fleet.tables.ModelArtifact``)."""

    @property
    def variant(self) -> str: ...

    @property
    def format(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...  # fleet.api.schemas.ModelMetadata as JSON

    @property
    def yanked_at(self) -> datetime | None: ...

    @property
    def yank_reason(self) -> str: ...


class _VariantMeta(BaseModel):
    """The part of ``ModelMetadata`` the choice reads; the rest is ignored."""

    model_config = ConfigDict(extra="ignore")

    quantization: str | None = None
    quality: int | None = Field(default=None, ge=0)
    ram_bytes: int | None = Field(default=None, ge=0)
    vram_bytes: int | None = Field(default=None, ge=0)
    requirements: VariantRequirements = _NO_REQUIREMENTS


def candidate_of(row: VariantRow) -> Candidate:
    """A registry row as a candidate; a yanked row or unreadable metadata is ``unusable``."""
    yanked = (
        f"yanked ({row.yank_reason or 'no reason given'})" if row.yanked_at is not None else None
    )
    try:
        meta = _VariantMeta.model_validate(dict(row.meta))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return Candidate(
            variant=row.variant,
            quality=quality_of(row.variant),
            size_bytes=row.size_bytes,
            format=row.format,
            unusable=yanked or f"its metadata does not validate ({where}: {first['msg']})",
        )
    return Candidate(
        variant=row.variant,
        quality=quality_of(row.variant, meta.quantization, meta.quality),
        size_bytes=row.size_bytes,
        format=row.format,
        ram_bytes=meta.ram_bytes,
        vram_bytes=meta.vram_bytes,
        requirements=meta.requirements,
        unusable=yanked,
    )


@dataclass(frozen=True)
class Chosen:
    """The variant a device should run, where, and why (including better ones refused)."""

    variant: str
    placement: Placement
    quality: int
    reason: str


@dataclass(frozen=True)
class Ineligible:
    """No variant fits: for each variant (best first), why not. Not an error."""

    reasons: Mapping[str, str]

    @property
    def summary(self) -> str:
        """One line for an admin."""
        if not self.reasons:
            return "no variant to choose from"
        return "no variant fits this device: " + "; ".join(
            f"{variant}: {why}" for variant, why in self.reasons.items()
        )


# --------------------------------------------------------------------------- the rules


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _with_headroom(n: int) -> int:
    return n + -(-n * HEADROOM_PERCENT // 100)  # rounded up


@dataclass(frozen=True)
class _Fit:
    placement: Placement
    detail: str


def _unknown(device: DeviceReport | None, what: str) -> str:
    return (
        "the device has not reported its hardware"
        if device is None
        else f"the device did not report {what}"
    )


def _whole(c: Candidate, device: DeviceReport | None) -> list[str]:
    """What rules the variant out wherever it would run: arch, L4T, runtimes."""
    req = c.requirements
    refusals = []
    if req.arch:
        arch = normalise_arch(device.arch) if device is not None and device.arch else None
        if arch is None:
            refusals.append(_unknown(device, "its architecture"))
        elif arch not in req.arch:
            refusals.append(f"built for {', '.join(req.arch)}, the device is {arch}")
    if req.min_l4t is not None:
        need = f"needs a Jetson with L4T {req.min_l4t} or later"
        if device is None:
            refusals.append(_unknown(device, "its L4T version"))
        elif not device.is_jetson:
            refusals.append(f"{need}, the device is not a Jetson")
        elif device.l4t_version is None:
            refusals.append(f"{need}: {_unknown(device, 'its L4T version')}")
        else:
            have = _version(device.l4t_version)
            if have is None or not _at_least(have, _version(req.min_l4t) or ()):
                refusals.append(f"{need}, the device has L4T {device.l4t_version}")
    for name, minimum in req.runtimes.items():
        need = f"needs {name} {minimum} or later"
        reported = device.runtimes.get(name) if device is not None else None
        if device is None:
            refusals.append(_unknown(device, "its runtimes"))
            break
        if reported is None:
            refusals.append(f"{need}, the device has no {name}")
            continue
        have = _version(reported)
        if have is None or not _at_least(have, _version(minimum) or ()):
            refusals.append(f"{need}, the device has {reported}")
    return refusals


def _gpu_runtime(c: Candidate, device: DeviceReport) -> str | None:
    """Why the variant's runtime cannot use the device's GPU, or None when it can."""
    if c.format == "gguf":
        return None if device.llama_gpu_offload else "its llama.cpp has no GPU offload"
    if c.format == "onnx":
        providers = device.runtimes.get("onnxruntime_providers", "").split(",")
        if any(p.strip() in _GPU_PROVIDERS for p in providers):
            return None
        return "its onnxruntime has no CUDA or TensorRT provider"
    return f"no runtime runs {c.format} on a GPU"


def _gpu_shortfall(c: Candidate, gpu: GpuInfo, shared: bool) -> str | None:
    memory = "shared memory" if shared else "VRAM"
    problems = []
    if c.vram_bytes is not None:
        need = _with_headroom(c.vram_bytes)
        if gpu.memory_total_bytes <= 0:
            problems.append(f"did not report its {memory}")
        elif gpu.memory_total_bytes < need:
            problems.append(
                f"needs {_size(need)} of {memory} with {HEADROOM_PERCENT}% headroom,"
                f" has {_size(gpu.memory_total_bytes)}"
            )
    minimum = c.requirements.min_compute_capability
    if minimum is not None:
        have = _version(gpu.compute_capability) if gpu.compute_capability else None
        if have is None:
            problems.append("did not report its compute capability")
        elif not _at_least(have, _version(minimum) or ()):
            problems.append(f"needs compute capability {minimum}, has {gpu.compute_capability}")
    return f"{gpu.name}: {' and '.join(problems)}" if problems else None


def _on_gpu(c: Candidate, device: DeviceReport | None) -> _Fit | str:
    if device is None:
        return _unknown(device, "its GPUs")
    if not device.gpus:
        return "the device has no GPU" if not device.is_jetson else _unknown(device, "its GPU")
    runtime = _gpu_runtime(c, device)
    if runtime is not None:
        return f"the device has a GPU but {runtime}"
    gpus = sorted(device.gpus, key=lambda g: (-g.memory_total_bytes, g.index))
    for gpu in gpus:
        if _gpu_shortfall(c, gpu, device.is_jetson) is None:
            memory = "shared memory" if device.is_jetson else "VRAM"
            need = (
                f"needs {_size(_with_headroom(c.vram_bytes))} of {_size(gpu.memory_total_bytes)}"
                f" {memory}"
                if c.vram_bytes is not None
                else "states no VRAM"
            )
            return _Fit("gpu", f"on the GPU ({gpu.name}): {need}")
    return _gpu_shortfall(c, gpus[0], device.is_jetson) or "no GPU fits"


def _on_cpu(c: Candidate, device: DeviceReport | None) -> _Fit | str:
    if c.ram_bytes is None:
        return _Fit("cpu", "on the CPU: states no RAM")
    if device is None or device.ram_total_bytes <= 0:
        return _unknown(device, "its RAM")
    need = _with_headroom(c.ram_bytes)
    if device.ram_total_bytes < need:
        return (
            f"needs {_size(need)} of RAM with {HEADROOM_PERCENT}% headroom,"
            f" the device has {_size(device.ram_total_bytes)}"
        )
    return _Fit("cpu", f"on the CPU: needs {_size(need)} of {_size(device.ram_total_bytes)} RAM")


def _assess(c: Candidate, device: DeviceReport | None) -> _Fit | str:
    if c.unusable is not None:
        return c.unusable
    refusals = _whole(c, device)
    if refusals:
        return "; ".join(dict.fromkeys(refusals))
    gpu = c.requirements.gpu
    on_gpu: _Fit | str | None = None
    if gpu == "required" or (gpu == "preferred" and c.vram_bytes is not None):
        on_gpu = _on_gpu(c, device)
        if isinstance(on_gpu, _Fit):
            return on_gpu
    if gpu == "required":
        return f"needs a GPU: {on_gpu}"
    on_cpu = _on_cpu(c, device)
    if on_gpu is None or device is None or not device.gpus:  # no GPU: no news
        return on_cpu
    if isinstance(on_cpu, _Fit):
        return _Fit("cpu", f"{on_cpu.detail} (not on the GPU: {on_gpu})")
    return f"on the GPU: {on_gpu}; on the CPU: {on_cpu}"


def fits(candidate: Candidate, device: DeviceReport | None) -> str | None:
    """None when ``candidate`` can run on ``device``, else why not (one line)."""
    result = _assess(candidate, device)
    return result if isinstance(result, str) else None


def _rank_key(c: Candidate, placement: Placement) -> tuple[int, int, int, str]:
    return (-c.quality, 0 if placement == "gpu" else 1, c.size_bytes, c.variant)


def choose_variant(
    candidates: Sequence[Candidate], device: DeviceReport | None
) -> Chosen | Ineligible:
    """The best variant of one model version for ``device``, or why none fits.

    ``candidates`` are the variants of one version (distinct names; build them with
    :func:`candidate_of`; yanked ones are refused with their reason). ``device`` is the
    device's last report, None before its first. Best: highest quality, then on the GPU,
    then the smaller file, then the name. Never raises for a device that fits nothing: that
    is :class:`Ineligible`, with a reason per variant, best variant first.
    """
    names = [c.variant for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {sorted(names)}")
    ranked = sorted(candidates, key=lambda c: _rank_key(c, "cpu"))
    refused: dict[str, str] = {}
    fitting: list[tuple[Candidate, _Fit]] = []
    for c in ranked:
        result = _assess(c, device)
        if isinstance(result, _Fit):
            fitting.append((c, result))
        else:
            refused[c.variant] = result
    if not fitting:
        return Ineligible(reasons=refused)
    best, fit = min(fitting, key=lambda cf: _rank_key(cf[0], cf[1].placement))
    better = [
        f"{c.variant}: {refused[c.variant]}"
        for c in ranked
        if c.variant in refused and c.quality > best.quality
    ]
    reason = f"{best.variant} (quality {best.quality}) {fit.detail}"
    if better:
        reason += "; better variants do not fit: " + "; ".join(better)
    return Chosen(
        variant=best.variant, placement=fit.placement, quality=best.quality, reason=reason
    )
