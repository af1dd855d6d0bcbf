"""Blobs in a folder: ``<root>/sha256/<first2>/<sha256>``, the default artifact backend.

A staged file is renamed into place atomically (``<root>/tmp`` is on the same file
system), so a reader sees a whole file or none. Files are owner-only (0600, folders
0700): the controller serves them itself, so a copied store or a loosened parent
folder exposes nothing. Replicas share the folder on one volume (NFS, a cluster file
system); the controller sends these files with ``FileResponse`` as they are.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fleet.errors import NotFound, StorageUnavailable
from fleet.files import fsync_dir
from fleet.registry import integrity
from fleet.registry.blobs import BlobStat, check_digest
from fleet.registry.integrity import Fingerprint
from models.values import SHA256

__all__ = ["READ_CHUNK_BYTES", "FolderBlobs"]

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024  # bytes per read when a file is sent in pieces


class FolderBlobs:
    """Files by address under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    @staticmethod
    def relative(sha256: str) -> Path:
        """Where a digest lives inside the folder; only a hex digest is accepted."""
        digest = check_digest(sha256)
        return Path("sha256") / digest[:2] / digest

    def path(self, sha256: str) -> Path:
        return self.root / self.relative(sha256)

    def stat(self, sha256: str) -> BlobStat | None:
        path = self.path(sha256)
        try:
            if not path.is_file():
                return None
            fingerprint = Fingerprint.of(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read artifact {sha256}: {exc}") from None
        return BlobStat(str(path), fingerprint.size, fingerprint, local=path)

    def put(self, sha256: str, staged: Path) -> BlobStat:
        target = self.path(sha256)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            staged.replace(target)  # atomic (one file system); owner-only, as mkstemp made it
            fsync_dir(target.parent)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write to the artifact store: {exc}") from None
        stat = self.stat(sha256)
        if stat is None:
            raise StorageUnavailable(f"artifact {sha256} went away as it was stored")
        return stat

    def digest(self, sha256: str, stat: BlobStat) -> str:
        try:
            return integrity.sha256_of(self.path(sha256))
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read artifact {sha256}: {exc}") from None

    def chunks(self, sha256: str, stat: BlobStat, start: int, end: int) -> Iterator[bytes]:
        try:
            f = self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read artifact {sha256}: {exc}") from None
        try:
            if Fingerprint.from_stat(os.fstat(f.fileno())) != stat.version:
                raise StorageUnavailable(f"artifact {sha256} changed since it was checked")
            f.seek(start)
        except BaseException:
            f.close()
            raise
        return _read(f, end - start)

    def quarantine(self, sha256: str, stat: BlobStat) -> str:
        path = self.path(sha256)
        target = self.root / "quarantine" / f"{sha256}-{time.time_ns()}"
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.replace(target)
        except FileNotFoundError:
            return str(target.parent)  # another replica moved it first
        except OSError as exc:
            log.error("cannot move corrupt artifact %s to quarantine: %s", path, exc)
            return str(path)
        log.error("artifact %s does not match its address: moved to %s", sha256, target)
        return str(target)

    def addresses(self) -> Iterator[str]:
        for path in sorted(self.root.glob("sha256/*/*")):
            if SHA256.fullmatch(path.name) and path.parent.name == path.name[:2]:
                yield path.name  # not a temporary file, nor anything not the store's


def _read(f: BinaryIO, remaining: int) -> Iterator[bytes]:
    with f:
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
