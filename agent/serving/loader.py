"""Turn a configured model into a served one: resolve its file, load it, schedule it.

Loading is blocking (llama.cpp and ONNX Runtime read hundreds of MB); callers run
it in a worker thread. The registry enforces the memory budget before and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import AgentSettings, ModelSpec
from agent.errors import ConfigError
from agent.runtime.base import ServedModel
from agent.serving.faults import FaultInjector, FaultyDecoder
from agent.serving.registry import ModelRegistry
from agent.serving.scheduler import BatchDecoder, BatchScheduler
from agent.store import ModelStore, manifest_for_file
from models.manifest import ModelFormat, ModelManifest

__all__ = ["load_model", "resolve"]

log = logging.getLogger(__name__)


def resolve(spec: ModelSpec, store: ModelStore) -> tuple[ModelManifest, Path]:
    """The manifest and file a spec names, with the spec's runtime overrides applied."""
    if spec.path is not None:
        manifest = manifest_for_file(spec.path, spec.name, spec.runtime)
        return manifest, spec.path
    manifest, path = store.resolve(spec.name)
    if spec.runtime is not None:
        manifest = manifest.model_copy(update={"runtime": spec.runtime})
    return manifest, path


def load_model(
    manifest: ModelManifest,
    path: Path,
    settings: AgentSettings,
    registry: ModelRegistry,
    faults: FaultInjector | None = None,
) -> ServedModel:
    """Load a resolved model within the memory budget; blocking.

    With ``faults`` (fault injection on), a GGUF model's decoder takes injected faults.
    """
    registry.check_budget(manifest.size_bytes, replacing=manifest.name)
    model: ServedModel
    if manifest.format is ModelFormat.GGUF:
        from agent.runtime.llama_cpp import load_gguf

        decoder: BatchDecoder = load_gguf(path, manifest)
        if faults is not None:
            decoder = FaultyDecoder(decoder, faults)
        model = BatchScheduler(decoder, queue_size=settings.queue_size)
    else:
        from agent.runtime.onnx import load_onnx

        tokenizer = manifest.runtime.tokenizer
        model = load_onnx(path, manifest, path.parent / tokenizer if tokenizer else None)
    try:
        registry.check_budget(model.info.memory_bytes, replacing=manifest.name)
    except ConfigError:
        model.close()
        raise
    info = model.info
    log.info(
        "loaded %s %s on %s (%s) in %.1f s, ~%d MiB",
        manifest.name,
        manifest.version,
        info.device,
        info.provider,
        info.load_seconds,
        info.memory_bytes >> 20,
    )
    return model
