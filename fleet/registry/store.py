"""A content-addressed folder of model files: ``<root>/sha256/<first2>/<sha256>``.

:meth:`ArtifactStore.ingest` streams bytes into a temporary file in the same folder
while hashing them in one pass, fsyncs it, and renames it into place atomically, so
a reader sees a whole file or none, and a crash leaves only a ``.tmp-*`` to sweep.
Identical content is stored once. Only a lower-case hex SHA-256 maps to a path, so
no request can name a file outside the store. Files are owner-only (0600, folders
0700): the controller serves them itself, so a copied store or a loosened parent
folder exposes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from fleet.errors import InvalidInput, StorageUnavailable, TooLarge
from fleet.files import fsync_dir
from models.values import SHA256

__all__ = ["WRITE_CHUNK_BYTES", "ArtifactStore", "Ingested", "check_digest"]

WRITE_CHUNK_BYTES = 1024 * 1024  # bytes gathered before one write (and one thread hop)


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lower-case hex digits; :class:`InvalidInput` otherwise."""
    if not SHA256.fullmatch(sha256):
        raise InvalidInput(f"{sha256[:80]!r} is not a SHA-256 digest (64 lower-case hex digits)")
    return sha256


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
        if target.is_file() and target.stat().st_size == self.size:
            self._path.unlink()
            return Ingested(sha256, self.size, new=False)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._path.replace(target)  # atomic (one file system); owner-only, as mkstemp made it
        fsync_dir(target.parent)
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
