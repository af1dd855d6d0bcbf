"""Whether a stored artifact is still the bytes its address names.

A content-addressed blob can be swapped or rot after it was signed; a device's hash
check would refuse it, but only after a whole download, and the controller would keep
answering 200. So the store hashes a blob before serving it, once per change of the
blob: what was verified is remembered by the blob's place and version
(:class:`~fleet.registry.blobs.BlobStat`: a file's identity and change time, an
object's ETag and Last-Modified), which any write moves. The memory is a cache only,
one per process: a replica that never saw a blob hashes it once itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from fleet.registry.blobs import Blobs, BlobStat

__all__ = ["VERIFIED", "Fingerprint", "VerifiedBlobs", "matches", "sha256_of"]


@dataclass(frozen=True)
class Fingerprint:
    """What changes whenever a file's bytes can have changed (ctime cannot be set back)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        return cls.from_stat(path.stat())

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedBlobs:
    """Blobs whose bytes matched their address, each by place, as its version was then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, Hashable] = {}

    def is_current(self, stat: BlobStat) -> bool:
        with self._lock:
            return self._seen.get(stat.where) == stat.version

    def remember(self, stat: BlobStat) -> None:
        with self._lock:
            self._seen[stat.where] = stat.version

    def forget(self, where: str) -> None:
        with self._lock:
            self._seen.pop(where, None)


VERIFIED = VerifiedBlobs()  # this process's memory of verified artifact blobs


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in pieces (a model may be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def matches(blobs: Blobs, sha256: str, stat: BlobStat) -> bool:
    """Whether that version hashes to ``sha256``; hashed only if changed since verified.

    The backend's errors propagate (``NotFound`` if it went away meanwhile).
    """
    if VERIFIED.is_current(stat):
        return True
    if blobs.digest(sha256, stat) != sha256:
        return False
    if blobs.stat(sha256) == stat:  # not changed while it was being hashed
        VERIFIED.remember(stat)
    return True
