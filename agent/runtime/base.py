"""What every loaded model offers the serving layer, whatever runs it.

Runtimes translate their library's exceptions into :mod:`agent.errors` at this
boundary, and report where they actually run (device, provider): never assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from models.manifest import ModelManifest

__all__ = [
    "RANDOM_SEED",
    "Embedder",
    "RuntimeInfo",
    "SamplingParams",
    "ServedModel",
    "TensorSpec",
    "TokenLogprob",
]


@dataclass(frozen=True)
class RuntimeInfo:
    """Where and how a model actually runs, as the runtime found it after loading."""

    runtime: str  # "llama.cpp" or "onnxruntime"
    runtime_version: str
    device: str  # "cpu", "cuda:0", ...
    provider: str  # llama.cpp backend or ONNX Runtime execution provider actually in use
    gpu_layers: int = 0  # llama.cpp layers offloaded to the GPU
    load_seconds: float = 0.0
    memory_bytes: int = 0  # weights plus context buffers, as far as the runtime can tell
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a tensor model, in Open Inference Protocol terms."""

    name: str
    datatype: str  # KServe v2 datatype: "FP32", "INT64", "BYTES", ...
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@runtime_checkable
class ServedModel(Protocol):
    """Anything the agent can serve: it knows what it is and how to let go of its memory."""

    @property
    def manifest(self) -> ModelManifest: ...

    @property
    def info(self) -> RuntimeInfo: ...

    def close(self) -> None:
        """Free the model's memory; idempotent."""


@runtime_checkable
class Embedder(ServedModel, Protocol):
    """A model that turns text into vectors and takes raw tensors (ONNX)."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the texts occupy after truncation, for usage accounting."""

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One L2-normalised row per text; blocking, call from a worker thread."""

    def infer(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run the graph on named tensors; blocking, call from a worker thread."""


RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a fresh seed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; temperature 0 means greedy and deterministic."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    grammar: str | None = None  # GBNF text every answer must match (checked before submit)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log probability of a chosen token, and of its likeliest alternatives.

    Taken from the raw logits, before penalties, grammar or temperature: what the
    model thought, which is what OpenAI's ``logprobs`` report. Pieces are resolved on
    the scheduler's thread, so shaping the answer never touches a model that may have
    been swapped out since.
    """

    token: int
    piece: bytes  # the token's bytes (may be part of a UTF-8 character)
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()  # (piece, logprob), likeliest first
