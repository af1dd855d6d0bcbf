"""A content-addressed folder of model files: ``<root>/sha256/<first2>/<sha256>``.

:meth:`ArtifactStore.ingest` streams bytes into a temporary file in the same folder
while hashing them in one pass, fsyncs it, and renames it into place atomically, so
a reader sees a whole file or none, and a crash leaves only a ``.tmp-*`` to sweep.
Identical content is stored once. Only a lower-case hex SHA-256 maps to a path, so
no request can name a file outside the store. Files are owner-only (0600, folders
0700): the controller serves them itself, so a copied store or a loosened parent
folder exposes nothing.

Bytes on disk can still change after they were stored (a swapped file, a bad disk):
:meth:`ArtifactStore.verified_path` hashes a file before it is served, once per change
of the file (:mod:`fleet.registry.integrity`), and :meth:`ArtifactStore.scrub` checks
every file. A file that no longer matches its address is moved to ``quarantine/`` and
reported, never served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from fleet.errors import ArtifactCorrupt, InvalidInput, NotFound, StorageUnavailable, TooLarge
from fleet.files import fsync_dir
from fleet.registry.integrity import VERIFIED, Fingerprint, matches
from models.values import SHA256

__all__ = [
    "WRITE_CHUNK_BYTES",
    "ArtifactStore",
    "Ingested",
    "ScrubReport",
    "check_digest",
]

log = logging.getLogger(__name__)

WRITE_CHUNK_BYTES = 1024 * 1024  # bytes gathered before one write (and one thread hop)


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lower-case hex digits; :class:`InvalidInput` otherwise."""
    if not SHA256.fullmatch(sha256):
        raise InvalidInput(f"{sha256[:80]!r} is not a SHA-256 digest (64 lower-case hex digits)")
    return sha256


@dataclass
class ScrubReport:
    """What :meth:`ArtifactStore.scrub` found: files checked, and where bad ones went."""

    checked: int = 0
    corrupt: dict[str, Path] = field(default_factory=dict)  # address -> quarantined file


@dataclass(frozen=True)
class Ingested:
    """What :meth:`ArtifactStore.ingest` stored."""

    sha256: str
    size: int  # bytes
    new: bool  # False: identical content was already there


class _Writer:
    """A temporary file in the store that hashes what it is given; commit or abort it."""

    def __init__(self, root: Path, max_bytes: int | None) -> None:
        self._root = root
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0
        tmp_dir = root / "tmp"
        tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=tmp_dir)
        self._path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            raise TooLarge(f"the upload is larger than {self._max} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> Ingested:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha256 = self._hash.hexdigest()
        final = ArtifactStore.relative(sha256)
        target = self._root / final
        if target.is_file() and target.stat().st_size == self.size and matches(target, sha256):
            self._path.unlink()
            return Ingested(sha256, self.size, new=False)
        # No file there, or one whose bytes changed: the new, hashed bytes replace it.
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._path.replace(target)  # atomic (one file system); owner-only, as mkstemp made it
        fsync_dir(target.parent)
        VERIFIED.remember(target, Fingerprint.of(target))  # hashed as it was written
        return Ingested(sha256, self.size, new=True)

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class ArtifactStore:
    """Model files by content; safe to share between controller replicas on one volume."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes  # uploads over this raise TooLarge; None: no limit

    @staticmethod
    def relative(sha256: str) -> Path:
        """Where a digest lives inside the store; only a hex digest is accepted."""
        digest = check_digest(sha256)
        return Path("sha256") / digest[:2] / digest

    def path(self, sha256: str) -> Path:
        return self.root / self.relative(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def verified_path(self, sha256: str) -> Path:
        """The file for ``sha256``, hashed first unless it is unchanged since last verified.

        :class:`NotFound` if there is none; :class:`ArtifactCorrupt` (after moving it to
        quarantine) if its bytes no longer hash to ``sha256``.
        """
        path = self.path(sha256)
        moved = self._check(path, sha256)
        if moved is not None:
            raise ArtifactCorrupt(
                f"the stored file for artifact {sha256} no longer hashes to it: moved to "
                f"{moved}; push the model again to restore it"
            )
        return path

    def scrub(self, progress: Callable[[str], None] | None = None) -> ScrubReport:
        """Hash every stored file against its address; quarantine and report the bad ones."""
        report = ScrubReport()
        for path in sorted(self.root.glob("sha256/*/*")):
            if not SHA256.fullmatch(path.name) or not path.is_file():
                continue  # a temporary file, or not the store's
            VERIFIED.forget(path)  # a scrub reads every byte again
            moved = self._check(path, path.name)
            report.checked += 1
            if moved is not None:
                report.corrupt[path.name] = moved
            if progress is not None:
                progress(path.name)
        return report

    def _check(self, path: Path, sha256: str) -> Path | None:
        """None if the file matches ``sha256``; else where it was moved to."""
        try:
            if matches(path, sha256):
                return None
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read artifact {sha256}: {exc}") from None
        return self._quarantine(path, sha256)

    def _quarantine(self, path: Path, sha256: str) -> Path:
        """Move a corrupt file aside (kept for inspection); where it went, or where it is."""
        VERIFIED.forget(path)
        target = self.root / "quarantine" / f"{sha256}-{time.time_ns()}"
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.replace(target)
        except FileNotFoundError:
            return target.parent  # another replica moved it first
        except OSError as exc:
            log.error("cannot move corrupt artifact %s to quarantine: %s", path, exc)
            return path
        log.error("artifact %s does not match its address: moved to %s", sha256, target)
        return target

    def _writer(self) -> _Writer:
        try:
            return _Writer(self.root, self.max_bytes)
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

    @staticmethod
    def _commit(writer: _Writer) -> Ingested:
        try:
            return writer.commit()
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to the artifact store: {exc}") from None

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
