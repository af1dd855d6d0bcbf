"""Model manifests: what a model on a device is, and how to run it.

The agent writes a manifest beside every installed model (``manifest.json`` in its
A/B slot); for a signed update it comes from the TUF target's custom fields, which the
controller fills from the same :class:`RuntimeParams` and :class:`ModelFormat`. It is
a frozen value: parse it once at the edge, pass it around without re-checking.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.values import VERSION, ModelName, Sha256

__all__ = ["KernelMode", "ModelFormat", "ModelManifest", "RuntimeParams"]


class ModelFormat(StrEnum):
    """The file formats the agent has a runtime for."""

    GGUF = "gguf"
    ONNX = "onnx"


class KernelMode(StrEnum):
    """Which llama.cpp kernels a GGUF model runs on (docs/serving.md, "Kernel modes").

    ``deterministic``: a greedy answer is the same whatever decodes beside it, however
    its prompt was chunked and whether its prefix came from the cache. ``fast``:
    upstream's kernel choices (repacked weights, flash attention where llama.cpp picks
    it), whose rounding depends on the batch.
    """

    DETERMINISTIC = "deterministic"
    FAST = "fast"


class RuntimeParams(BaseModel):
    """How to run a model; every field has a default that works on a CPU-only box."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context_length: int = Field(default=2048, ge=64, le=1 << 20)  # tokens per sequence (slot)
    parallel_slots: int = Field(default=8, ge=1, le=256)  # sequences decoded together
    batch_tokens: int = Field(default=512, ge=16, le=1 << 16)  # tokens per llama_decode step
    gpu_layers: int = Field(default=-1, ge=-1)  # -1: offload all layers when a GPU is usable
    threads: int | None = Field(default=None, ge=1, le=512)  # None: one per physical core
    max_tokens_default: int = Field(default=512, ge=1)  # when a request names none
    embedding_dim: int | None = Field(default=None, ge=1)  # ONNX embedders
    max_input_tokens: int = Field(default=256, ge=1)  # ONNX embedders: truncate beyond this
    tokenizer: str | None = None  # ONNX: tokenizer.json path relative to the model folder
    chat_template: str | None = None  # GGUF without its own template: a llama.cpp built-in name
    kernels: KernelMode = KernelMode.DETERMINISTIC  # GGUF: batch-invariant or upstream's kernels
    extra: dict[str, Any] = Field(default_factory=dict)


class ModelManifest(BaseModel):
    """One installed model: identity, integrity and how to run it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    name: ModelName
    version: str
    format: ModelFormat
    file: str = Field(description="file name inside the model folder")
    sha256: Sha256
    size_bytes: int = Field(ge=0)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)

    def model_post_init(self, context: Any, /) -> None:
        """Reject names that could escape the model folder or confuse a version sort."""
        if not VERSION.fullmatch(self.version):
            raise ValueError(f"invalid version {self.version!r}: use letters, digits and .+_-")
        if "/" in self.file or "\\" in self.file or self.file in {"", ".", ".."}:
            raise ValueError(f"invalid file name {self.file!r}: must be a plain name")
