"""The registry's artifacts: the seeded models, their versions, variants and metadata."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet.simulate.seed.config import DAY, GEMMA, MINILM
from fleet.simulate.seed.rules import target_path
from models.wire import (
    DesiredModel,
    TargetRef,
)


@dataclass(frozen=True)
class _Artifact:
    name: str
    version: str
    variant: str
    format: str
    sha256: str
    size_bytes: int
    meta: dict[str, Any]
    created_at: datetime

    @property
    def path(self) -> str:
        return target_path(self.name, self.version, self.variant, self.format)

    def desired(self) -> DesiredModel:
        target = TargetRef(path=self.path, length=self.size_bytes, sha256=self.sha256)
        return DesiredModel(name=self.name, version=self.version, target=target)


def _meta(quantization: str, ram: int, vram: int | None, gpu: str, context: int) -> dict[str, Any]:
    """``fleet.api.schemas.ModelMetadata`` as the registry stores it."""
    requirements: dict[str, Any] = {
        "arch": [], "gpu": gpu, "min_compute_capability": None, "min_l4t": None, "runtimes": {},
    }  # fmt: skip
    return {
        "quantization": quantization, "quality": None, "ram_bytes": ram, "vram_bytes": vram,
        "requirements": requirements, "context_length": context, "runtime": None,
        "golden_prompts": [], "licence": None, "card": "",
    }  # fmt: skip


def _artifacts(seed: int, now: datetime) -> list[_Artifact]:
    found = []
    gemma_variants = (
        ("Q4_K_M", 253_000_000, _meta("Q4_K_M", 2_200_000_000, 420_000_000, "preferred", 32768)),
        ("Q8_0", 292_000_000, _meta("Q8_0", 2_600_000_000, 600_000_000, "required", 32768)),
    )
    for version, age in (("1.0", 60 * DAY), ("1.1", 8 * DAY), ("1.2", DAY)):
        for variant, size, meta in gemma_variants:
            digest = hashlib.sha256(f"{seed}/{GEMMA}/{version}/{variant}".encode()).hexdigest()
            found.append(_Artifact(GEMMA, version, variant, "gguf", digest, size, meta, now - age))
    for version, age in (("1.0", 90 * DAY), ("2.0", 4 * DAY)):
        digest = hashlib.sha256(f"{seed}/{MINILM}/{version}/int8".encode()).hexdigest()
        meta = _meta("int8", 120_000_000, None, "none", 512)
        found.append(
            _Artifact(MINILM, version, "int8", "onnx", digest, 23_000_000, meta, now - age)
        )
    return found
