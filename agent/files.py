"""Durable, private files: the agent's one way to replace a file.

:func:`atomic_file` writes to a temporary sibling, fsyncs it, renames it over the target
and fsyncs the folder, so readers see the old file or the new one, never half, and the
new one survives a power cut once the call returns. Everything the agent persists goes
through it (identity, device key, desired state, slot state and manifests, update
attempts). Files are created owner-only (0600) with ``os.open``, never written and then
chmod-ed, so a secret is not world-readable even for an instant; folders are 0700. A
public file (``mode=0o644``: a trust anchor stamped into an image) gets its mode before
it is renamed into place, whatever the umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from agent.errors import ConfigError
from models.manifest import ModelFormat

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "atomic_file",
    "atomic_write",
    "ensure_private_dir",
    "format_of",
    "fsync_dir",
    "fsync_file",
    "mkdir_durable",
    "sha256_file",
]

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
    """Make a rename (or a new entry) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def mkdir_durable(path: Path) -> None:
    """Create ``path`` (and its parents) so that it survives a power cut."""
    if path.is_dir():
        return
    if not path.parent.is_dir():
        mkdir_durable(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(
    target: Path, *, exclusive: bool = False, mode: int = PRIVATE_FILE, durable: bool = True
) -> Iterator[Path]:
    """Yield a temporary path (``mode``, 0600 by default) to fill; on exit it becomes ``target``.

    If the body raises, ``target`` is untouched and the temporary file is removed. With
    ``exclusive``, fail with :class:`FileExistsError` if ``target`` exists (the device
    key must never be replaced behind an enrolled identity). ``durable=False`` skips the
    fsyncs: readers still see the old file or the new one, but a power cut may keep the
    old one (a progress file rewritten often, where an fsync would stall the caller).
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        if mode != PRIVATE_FILE:
            os.fchmod(fd, mode)  # exactly ``mode``: os.open's mode is cut by the umask
    finally:
        os.close(fd)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        if exclusive:
            _link_new(tmp, target)
        else:
            tmp.replace(target)
        if durable:
            fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(
    path: Path,
    data: bytes,
    *,
    exclusive: bool = False,
    mode: int = PRIVATE_FILE,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data`` through :func:`atomic_file`."""
    with atomic_file(path, exclusive=exclusive, mode=mode, durable=durable) as tmp:
        tmp.write_bytes(data)


def _link_new(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` only if nothing has it yet."""
    try:
        os.link(tmp, target)  # atomic, and fails if target exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename
        if target.exists():
            raise FileExistsError(target) from None
        tmp.replace(target)
