"""The seam under the artifact store: bytes by SHA-256 address, in a folder or in S3.

:class:`~fleet.registry.store.ArtifactStore` hashes uploads, dedupes them and checks
stored bytes against their address; a :class:`Blobs` only keeps bytes. Two kinds:
:class:`~fleet.registry.folder.FolderBlobs` (a local or shared folder, the default)
and :class:`~fleet.registry.s3.S3Blobs` (an S3-compatible bucket). Every method takes
an address already checked by :func:`check_digest`, and raises only the controller's
errors (:mod:`fleet.errors`): ``NotFound``, ``StorageUnavailable`` (retry),
``ConfigError`` (an operator must fix the settings or the permissions).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleet.errors import InvalidInput
from models.values import SHA256

__all__ = ["BlobStat", "Blobs", "check_digest"]


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lower-case hex digits; :class:`InvalidInput` otherwise."""
    if not SHA256.fullmatch(sha256):
        raise InvalidInput(f"{sha256[:80]!r} is not a SHA-256 digest (64 lower-case hex digits)")
    return sha256


@dataclass(frozen=True)
class BlobStat:
    """One stored version of a blob: what a check of its bytes is remembered by."""

    where: str  # the blob's own place, for people: a file's path, s3://bucket/key
    size: int  # bytes
    version: Hashable  # changes whenever the bytes can have changed (no false "same")
    local: Path | None = None  # a file the controller can send as is; None: read by range


class Blobs(Protocol):
    """Bytes by address; shared by every controller replica."""

    @property
    def location(self) -> str:
        """Where the blobs are, for people: a folder, or ``s3://bucket/prefix``."""
        ...

    def stat(self, sha256: str) -> BlobStat | None:
        """The stored version at ``sha256``; None if there is none."""
        ...

    def put(self, sha256: str, staged: Path) -> BlobStat:
        """Store a local file already hashed to ``sha256``; it is consumed either way."""
        ...

    def digest(self, sha256: str, stat: BlobStat) -> str:
        """The SHA-256 of that version's bytes, all of them read again."""
        ...

    def chunks(self, sha256: str, stat: BlobStat, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of that version; opened before the first is asked for.

        ``StorageUnavailable`` if the blob changed since ``stat`` was taken.
        """
        ...

    def quarantine(self, sha256: str, stat: BlobStat) -> str:
        """Move that version aside, kept for inspection; where it went (or where it is)."""
        ...

    def addresses(self) -> Iterator[str]:
        """Every stored address, in order; temporary and quarantined blobs are not."""
        ...
