"""Durable, private files: created 0600, replaced atomically, renames fsync-ed.

Secrets (the device key, broker credentials) are never world-readable, not even
for an instant: files are created with ``os.open(..., 0o600)`` rather than
written and then chmod-ed, in a folder that is itself 0700.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path

from agent.errors import ConfigError
from models.manifest import ModelFormat

__all__ = ["atomic_write", "ensure_private_dir", "format_of", "fsync_dir", "sha256_file"]

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def format_of(path: Path) -> ModelFormat:
    """The model format a file name says (``.gguf`` or ``.onnx``)."""
    suffix = path.suffix.lower().lstrip(".")
    try:
        return ModelFormat(suffix)
    except ValueError:
        raise ConfigError(
            f"{path}: unknown model format {path.suffix!r}; expected .gguf or .onnx"
        ) from None


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; tighten it if group or others can read it."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & ~0o077)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (mode 0600) so readers see the old or the new file, never half.

    With ``exclusive``, fail with :class:`FileExistsError` if ``path`` exists (used for
    the device key, which must never be replaced behind an enrolled identity).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(path) from None
                tmp.replace(path)
        else:
            tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
