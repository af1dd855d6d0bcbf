"""Whether a stored artifact is still the bytes its address names.

A content-addressed file can be swapped or rot on disk after it was signed; a device's
hash check would refuse it, but only after a whole download, and the controller would
keep answering 200. So the store hashes a file before serving it, once per change of
the file: what was verified is remembered by the file's identity and change time
(:class:`Fingerprint`), which any write, rename or ``touch`` moves. The memory is a
cache only, one per process: a replica that never saw a file hashes it once itself.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VERIFIED", "Fingerprint", "VerifiedFiles", "matches", "sha256_of"]


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
        st = path.stat()
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """Files whose bytes matched their address, each as its fingerprint was then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, Fingerprint] = {}

    def is_current(self, path: Path, fingerprint: Fingerprint) -> bool:
        with self._lock:
            return self._seen.get(path) == fingerprint

    def remember(self, path: Path, fingerprint: Fingerprint) -> None:
        with self._lock:
            self._seen[path] = fingerprint

    def forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)


VERIFIED = VerifiedFiles()  # this process's memory of verified artifact files


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in pieces (a model may be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def matches(path: Path, sha256: str) -> bool:
    """Whether the file's bytes hash to ``sha256``; hashed only if changed since verified.

    OSError (FileNotFoundError included) propagates: the caller knows what it means.
    """
    before = Fingerprint.of(path)
    if VERIFIED.is_current(path, before):
        return True
    if sha256_of(path) != sha256:
        return False
    if Fingerprint.of(path) == before:  # not changed while it was being hashed
        VERIFIED.remember(path, before)
    return True
