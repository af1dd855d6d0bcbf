"""Durable, private files: the controller's one way to write a file.

:func:`atomic_write` writes to a temporary sibling, fsyncs it, renames it over the
target and fsyncs the folder, so readers see the old file or the new one, never half
of one, and the new one survives a power cut once the call returns. Everything the
controller persists whole goes through it (broker auth files and password, admin
token, TUF metadata and keys, signed metadata the CLI writes, the simulator's
identities and stats); model files stream into the artifact store, which fsyncs the
same way. Files are created owner-only (0600) with ``os.open``, never written and
then chmod-ed, so a secret is not readable by others even for an instant; folders
are 0700. :func:`private_file` gives a file something else creates (SQLite's
database) the same mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "PUBLIC_FILE",
    "atomic_write",
    "fsync_dir",
    "private_dir",
    "private_file",
]

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PUBLIC_FILE = 0o644  # what anyone may read anyway: TUF metadata, signed or to be signed


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new entry) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; tighten it if group or others can read it."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(mode & ~0o077)
    return path


def private_file(path: Path, *, create: bool = True) -> Path:
    """Tighten ``path`` if group or others can read it; create it empty (0600) if missing.

    With ``create`` False a missing file is :class:`FileNotFoundError`, never created.
    """
    flags = os.O_RDONLY | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & ~0o077)
    finally:
        os.close(fd)
    return path


def atomic_write(
    path: Path, data: bytes, *, mode: int = PRIVATE_FILE, exclusive: bool = False
) -> None:
    """Replace ``path`` with ``data``, atomically and durably; a new file gets ``mode``.

    With ``exclusive``, raise :class:`FileExistsError` if ``path`` exists instead of
    replacing it: a secret generated once (the admin token, the broker password) must
    never change behind the processes that read it, even when two start together.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            _link_new(tmp, path)
        else:
            tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _link_new(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` only if nothing has it yet."""
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        tmp.replace(path)
