"""Model files by content: hashed as they arrive, kept by a :class:`~fleet.registry.blobs.Blobs`.

:meth:`ArtifactStore.ingest` streams bytes into a local temporary file (``<root>/tmp``)
while hashing them in one pass, fsyncs it, and hands it to the backend under its
SHA-256: renamed into ``<root>/sha256/<first2>/<sha256>`` (:mod:`fleet.registry.folder`,
the default) or uploaded to a bucket (:mod:`fleet.registry.s3`). A crash leaves only
a ``.tmp-*`` to sweep. Identical content is stored once. Only a lower-case hex
SHA-256 is an address, so no request can name anything outside the store.

Stored bytes can still change afterwards (a swapped file, a bad disk, a bucket
written by someone else): :meth:`ArtifactStore.verified` hashes a blob before it is
served, once per change of the blob (:mod:`fleet.registry.integrity`), and
:meth:`ArtifactStore.scrub` checks every blob. One that no longer matches its address
is moved to ``quarantine/`` and reported, never served.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from fleet.errors import ArtifactCorrupt, NotFound, StorageUnavailable, TooLarge
from fleet.registry.blobs import Blobs, BlobStat, check_digest
from fleet.registry.folder import FolderBlobs
from fleet.registry.integrity import VERIFIED, matches

__all__ = [
    "WRITE_CHUNK_BYTES",
    "ArtifactStore",
    "Ingested",
    "ScrubReport",
    "check_digest",
]

WRITE_CHUNK_BYTES = 1024 * 1024  # bytes gathered before one write (and one thread hop)


@dataclass
class ScrubReport:
    """What :meth:`ArtifactStore.scrub` found: blobs checked, and where bad ones went."""

    checked: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)  # address -> where it was moved


@dataclass(frozen=True)
class Ingested:
    """What :meth:`ArtifactStore.ingest` stored."""

    sha256: str
    size: int  # bytes
    new: bool  # False: identical content was already there


class _Writer:
    """A local temporary file that hashes what it is given; finish or abort it."""

    def __init__(self, staging: Path, max_bytes: int | None) -> None:
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=staging)
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            raise TooLarge(f"the upload is larger than {self._max} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush and close the file; its SHA-256."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    """Model files by content; safe to share between controller replicas.

    ``root`` is a local folder: the store itself for the folder backend (the default),
    only the staging area for uploads otherwise.
    """

    def __init__(
        self, root: Path, *, max_bytes: int | None = None, blobs: Blobs | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes  # uploads over this raise TooLarge; None: no limit
        self.blobs: Blobs = blobs if blobs is not None else FolderBlobs(root)

    @property
    def location(self) -> str:
        """Where the blobs are, for people: a folder or ``s3://bucket/prefix``."""
        return self.blobs.location

    @staticmethod
    def relative(sha256: str) -> Path:
        """Where a digest lives inside a folder store; only a hex digest is accepted."""
        return FolderBlobs.relative(sha256)

    def path(self, sha256: str) -> Path:
        """The folder backend's file for ``sha256`` (under ``root``)."""
        return self.root / self.relative(sha256)

    def has(self, sha256: str) -> bool:
        return self.blobs.stat(check_digest(sha256)) is not None

    def verified(self, sha256: str) -> BlobStat:
        """The blob for ``sha256``, hashed first unless it is unchanged since last verified.

        :class:`NotFound` if there is none; :class:`ArtifactCorrupt` (after moving it to
        quarantine) if its bytes no longer hash to ``sha256``.
        """
        digest = check_digest(sha256)
        stat = self.blobs.stat(digest)
        if stat is None:
            raise NotFound(f"no artifact {digest}")
        moved = self._check(digest, stat)
        if moved is not None:
            raise ArtifactCorrupt(
                f"the stored blob for artifact {digest} no longer hashes to it: moved to "
                f"{moved}; push the model again to restore it"
            )
        return stat

    def chunks(self, sha256: str, stat: BlobStat, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a version :meth:`verified` returned.

        ``StorageUnavailable`` if the blob changed since: its new version is hashed on
        the next :meth:`verified`, as any version the memory has not seen.
        """
        return self.blobs.chunks(check_digest(sha256), stat, start, end)

    def scrub(self, progress: Callable[[str], None] | None = None) -> ScrubReport:
        """Hash every stored blob against its address; quarantine and report the bad ones."""
        report = ScrubReport()
        for digest in self.blobs.addresses():
            stat = self.blobs.stat(digest)
            if stat is None:
                continue  # removed since it was listed
            VERIFIED.forget(stat.where)  # a scrub reads every byte again
            try:
                moved = self._check(digest, stat)
            except NotFound:
                continue
            report.checked += 1
            if moved is not None:
                report.corrupt[digest] = moved
            if progress is not None:
                progress(digest)
        return report

    def _check(self, sha256: str, stat: BlobStat) -> str | None:
        """None if the blob matches ``sha256``; else where it was moved to."""
        if matches(self.blobs, sha256, stat):
            return None
        VERIFIED.forget(stat.where)
        return self.blobs.quarantine(sha256, stat)

    def _writer(self) -> _Writer:
        try:
            return _Writer(self.root / "tmp", self.max_bytes)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to the artifact store: {exc}") from None

    def ingest_sync(self, chunks: Iterable[bytes]) -> Ingested:
        """Store ``chunks`` (blocking); see :meth:`ingest`."""
        writer = self._writer()
        return self._run(writer, lambda: _feed(writer, chunks))

    async def ingest(
        self, stream: AsyncIterable[bytes], *, on_first: Callable[[bytes], None] | None = None
    ) -> Ingested:
        """Store ``stream`` under its SHA-256; ``on_first`` sees the first bytes and may raise.

        Any exception (a client that went away, ``on_first`` refusing the content, the
        size limit) removes the temporary file and propagates.
        """
        writer = await run_in_threadpool(self._writer)
        pending = bytearray()
        first = True
        try:
            async for chunk in stream:
                if first and chunk:
                    if on_first is not None:
                        on_first(bytes(chunk[:16]))
                    first = False
                pending += chunk
                if len(pending) >= WRITE_CHUNK_BYTES:
                    await run_in_threadpool(self._write, writer, bytes(pending))
                    pending.clear()
            if first and on_first is not None:
                on_first(b"")
            if pending:
                await run_in_threadpool(self._write, writer, bytes(pending))
            return await run_in_threadpool(self._commit, writer)
        except BaseException:
            await run_in_threadpool(writer.abort)
            raise

    @staticmethod
    def _write(writer: _Writer, chunk: bytes) -> None:
        try:
            writer.write(chunk)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to the artifact store: {exc}") from None

    def _commit(self, writer: _Writer) -> Ingested:
        try:
            sha256 = writer.finish()
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to the artifact store: {exc}") from None
        there = self.blobs.stat(sha256)
        if there is not None and there.size == writer.size and self._still_good(sha256, there):
            writer.path.unlink()
            return Ingested(sha256, writer.size, new=False)
        # Nothing there, or a blob whose bytes changed: the new, hashed bytes replace it.
        VERIFIED.remember(self.blobs.put(sha256, writer.path))  # hashed as it was written
        return Ingested(sha256, writer.size, new=True)

    def _still_good(self, sha256: str, stat: BlobStat) -> bool:
        try:
            return matches(self.blobs, sha256, stat)
        except NotFound:
            return False  # removed meanwhile: store it again

    def _run(self, writer: _Writer, feed: Callable[[], None]) -> Ingested:
        try:
            feed()
            return self._commit(writer)
        except BaseException:
            writer.abort()
            raise


def _feed(writer: _Writer, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        ArtifactStore._write(writer, chunk)
