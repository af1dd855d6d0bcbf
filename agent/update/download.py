"""Stream one artifact to disk: resumable, capped at its signed length, hashed in one pass.

The verified TUF targets metadata gives each artifact a length and a sha256; this module
makes sure nothing else ever lands at ``dest``. Bytes go to ``<dest>.part`` beside it (same
filesystem, so the final rename is atomic) and are hashed as they are written, so the file is
never read back: a resumed download re-hashes the bytes already on disk once, then goes on
hashing the stream. Only a matching file is fsynced and renamed into place, so a crash leaves
the old state or a resumable ``.part``, never a half file under the real name.

    DownloadError               every download error (a family on agent.errors' tree)
    ├── DownloadRejected        Rejected: retrying as is cannot help: fix source, metadata, disk
    │   ├── ArtifactMismatch    the server's bytes are not the signed artifact (too long, wrong
    │   │                       total, wrong hash): the ``.part`` is deleted, a retry starts clean
    │   └── NotEnoughDisk       no room for the rest plus the margin kept free
    └── DownloadUnavailable     Transient: connection failed, stalled, 5xx, deadline: the
                                ``.part`` is kept

httpx and OS errors are translated here. The decisions (what to ask for, what an answer
means) are pure functions, tested without a server; :func:`download` only does the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Literal

import httpx

from agent.backoff import Backoff, Retry
from agent.errors import AgentError, Rejected, Transient
from agent.files import fsync_dir
from models.values import SHA256

__all__ = [
    "COMPLETE",
    "ArtifactMismatch",
    "DownloadConfig",
    "DownloadError",
    "DownloadRejected",
    "DownloadUnavailable",
    "Fetch",
    "NotEnoughDisk",
    "check_response",
    "download",
    "part_path",
    "plan_request",
]

log = logging.getLogger(__name__)

Complete = Literal["complete"]
COMPLETE: Final[Complete] = "complete"

Progress = Callable[[int, int], None]

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", re.IGNORECASE)


class DownloadError(AgentError):
    """Every download error; :func:`agent.errors.retryable` tells the two branches apart."""


class DownloadRejected(DownloadError, Rejected):
    """The artifact cannot be had as asked; the same download will fail the same way."""


class ArtifactMismatch(DownloadRejected):
    """The server's bytes are not the signed artifact; the partial file has been deleted."""


class NotEnoughDisk(DownloadRejected):
    """The destination's filesystem lacks room; nothing was requested, the ``.part`` is kept."""

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class DownloadUnavailable(DownloadError, Transient):
    """The transfer failed in a way that may pass; calling again resumes from the ``.part``."""


@dataclass(frozen=True)
class DownloadConfig:
    """Knobs for one download; the defaults suit a model of a few GB over a flaky link."""

    chunk_bytes: int = 1 << 20  # bytes; write, hash and report progress in blocks of this size
    stall_timeout_s: float = 30.0  # seconds without a single byte before an attempt is dropped
    deadline_s: float = 3600.0  # seconds for the whole download, retries and waits included
    max_attempts: int = 5  # requests in all, the first one included
    backoff: Backoff = field(  # seconds between attempts (initial/cap), fully jittered
        default_factory=lambda: Backoff(initial_s=1.0, cap_s=60.0)
    )
    min_free_bytes: int = 256 << 20  # bytes the filesystem must still have free once done

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.max_attempts < 1 or self.min_free_bytes < 0:
            raise ValueError("need chunk_bytes > 0, max_attempts >= 1 and min_free_bytes >= 0")
        if self.stall_timeout_s <= 0 or self.deadline_s <= 0:
            raise ValueError("need stall_timeout_s > 0 and deadline_s > 0")


@dataclass(frozen=True)
class Fetch:
    """Ask for the artifact from byte ``offset`` on (all of it when 0)."""

    offset: int

    @property
    def headers(self) -> dict[str, str]:
        # identity: a compressed body would make byte offsets and the length cap meaningless.
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        return headers


def part_path(dest: Path) -> Path:
    """Where ``dest`` is assembled: beside it, so the final rename never crosses filesystems."""
    return dest.with_name(dest.name + ".part")


def plan_request(part_size: int, length: int) -> Fetch | Complete:
    """What to ask for, given how many bytes the ``.part`` already holds.

    A part longer than the signed length cannot be a prefix of the artifact, so it is
    dropped (``Fetch(0)``); a part of exactly the signed length needs no request at all:
    its hash decides.
    """
    if part_size == length:
        return COMPLETE
    if part_size > length:
        return Fetch(0)
    return Fetch(part_size)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/n`` as ``(a, b, n)``; ``*`` parts are None; unreadable → rejected."""
    match = _CONTENT_RANGE.fullmatch(value or "")
    if match is None:
        raise DownloadRejected(f"unreadable Content-Range {value!r}")
    first, last, total = match.groups()
    return (
        None if first is None else int(first),
        None if last is None else int(last),
        None if total == "*" else int(total),
    )


def check_response(
    status: int,
    content_range: str | None,
    offset: int,
    length: int,
    *,
    content_length: str | None = None,
) -> int | Complete:
    """Where in the artifact the body starts, or COMPLETE; raises what the answer means.

    200 always starts at 0 (a server ignoring Range: the caller restarts rather than append);
    206 must start exactly at ``offset``; 416 means done only when ``offset == length``.
    A declared body longer than the rest of the signed length is refused before any byte is
    written. 408, 429 and 5xx are transient; any other status is a refusal.
    """
    if status == 200:
        start = 0
    elif status == 206:
        first, last, total = _parse_content_range(content_range)
        if first is None or last is None:
            raise DownloadRejected(f"206 without a byte range (Content-Range {content_range!r})")
        if first != offset:
            raise DownloadRejected(
                f"asked for bytes from {offset}, the server sent a range starting at {first}"
            )
        if (total is not None and total != length) or last >= length:
            raise ArtifactMismatch(
                f"the server's artifact ({content_range}) is not the signed length of {length} "
                "bytes"
            )
        start = first
    elif status == 416:
        total = None
        if content_range is not None:
            total = _parse_content_range(content_range)[2]
        if offset == length and total in (None, length):
            return COMPLETE
        raise ArtifactMismatch(
            f"the server cannot serve bytes from {offset} (its size: {total}); "
            f"the signed length is {length}"
        )
    elif status in (408, 429) or status >= 500:
        raise DownloadUnavailable(f"the server answered HTTP {status}")
    else:
        raise DownloadRejected(f"the server answered HTTP {status}")
    declared = _int_or_none(content_length)
    if declared is not None and declared > length - start:
        raise ArtifactMismatch(
            f"the server declares {declared} bytes from {start}: longer than the signed length "
            f"of {length} bytes"
        )
    if declared is not None and status == 200 and declared < length:
        raise ArtifactMismatch(
            f"the server's artifact is {declared} bytes, shorter than the signed {length}"
        )
    return start


def _int_or_none(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _human(n: int) -> str:
    """Bytes for people: ``1.5 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _check_disk(folder: Path, *, missing: int, margin: int) -> None:
    """Refuse to start a download that would fill the disk (``margin`` is kept free)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise DownloadRejected(f"cannot check free space in {folder}: {exc}") from exc
    needed = missing + margin
    if free < needed:
        raise NotEnoughDisk(
            f"not enough disk in {folder}: need {_human(needed)} ({_human(missing)} to download "
            f"plus {_human(margin)} kept free), {_human(free)} available",
            needed=needed,
            available=free,
        )


class _PartFile:
    """The open ``.part``: appends, hashes exactly what it appends, counts what it holds.

    Bytes are buffered up to ``chunk_bytes``; each full block is written and hashed on a
    worker thread while the next one arrives (file writes and sha256 release the GIL), with
    at most one block in flight, so receiving never waits on the disk or the hash unless
    both fall a block behind. Progress is reported on the event loop once a block is on
    disk. The lock keeps ``close`` from racing a worker thread still writing or finishing.
    """

    def __init__(self, path: Path, file: BinaryIO, length: int, chunk_bytes: int) -> None:
        self.path = path
        self.length = length
        self.done = 0  # bytes written to the file and fed to the hash
        self.progress: Progress | None = None
        self._file = file
        self._chunk_bytes = chunk_bytes
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._in_flight: asyncio.Future[None] | None = None
        self._received = 0  # bytes accepted: written, in flight or buffered (event loop only)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, keep: int, length: int, chunk_bytes: int) -> _PartFile:
        """Open (or create) the part, keep its first ``keep`` bytes and hash them, once."""
        try:
            file = path.open("a+b")  # appends go to the end whatever we read
        except OSError as exc:
            raise DownloadRejected(f"cannot open {path}: {exc}") from exc
        part = cls(path, file, length, chunk_bytes)
        try:
            with part._lock:
                file.truncate(keep)
                file.seek(0)
                while part.done < keep:
                    block = file.read(min(chunk_bytes, keep - part.done))
                    if not block:  # shrank under us: keep what was read
                        file.truncate(part.done)
                        break
                    part._hash.update(block)
                    part.done += len(block)
                part._received = part.done
        except OSError as exc:
            file.close()
            raise DownloadRejected(f"cannot read {path}: {exc}") from exc
        except BaseException:
            file.close()
            raise
        return part

    async def feed(self, data: bytes) -> None:
        """Take bytes from the wire; refuse any that would pass the signed length."""
        if self._received + len(data) > self.length:
            raise ArtifactMismatch(
                f"the server sent more bytes: longer than the signed length of {self.length}"
            )
        self._received += len(data)
        self._buffer += data
        if len(self._buffer) >= self._chunk_bytes:
            await self._settle()  # backpressure: one block in flight at most
            block, self._buffer = self._buffer, bytearray()
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self._append, block))

    async def flush(self) -> None:
        """Write and hash everything received so far; returns once it is all in the file."""
        await self._settle()
        if self._buffer:
            block, self._buffer = self._buffer, bytearray()
            self._append(block)
            self._report()

    async def _settle(self) -> None:
        """Wait for the block in flight (its errors surface here), then report progress."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        try:
            await asyncio.shield(in_flight)
        except asyncio.CancelledError:
            await in_flight  # the write must end before anyone else touches the file
            raise
        self._report()

    def _append(self, block: bytearray) -> None:
        with self._lock:
            try:
                self._file.write(block)
            except OSError as exc:
                raise DownloadRejected(f"cannot write {self.path}: {exc}") from exc
            self._hash.update(block)
            self.done += len(block)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.length)

    def restart(self) -> None:
        """Forget everything: the server is sending the artifact from byte 0 (call settled)."""
        assert self._in_flight is None, "restart with a block in flight"
        try:
            self._file.truncate(0)
        except OSError as exc:
            raise DownloadRejected(f"cannot truncate {self.path}: {exc}") from exc
        self._hash = hashlib.sha256()
        self._buffer.clear()
        self.done = self._received = 0

    def finish(self, dest: Path, sha256: str) -> None:
        """Verify, make durable, rename into place; runs in a worker thread (fsync blocks)."""
        with self._lock:
            if self._buffer or self.done != self.length:
                raise AssertionError("finish before the whole artifact was written")
            actual = self._hash.hexdigest()
            if actual != sha256:
                raise ArtifactMismatch(f"sha256 {actual} does not match the signed {sha256}")
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self.path.replace(dest)  # atomic: same folder, same filesystem
                fsync_dir(dest.parent)  # the rename itself must survive a power cut
            except OSError as exc:
                raise DownloadRejected(f"cannot move {self.path} to {dest}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._file.close()


async def download(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    *,
    length: int,
    sha256: str,
    config: DownloadConfig,
    progress: Progress | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` only if it is exactly ``length`` bytes hashing to ``sha256``.

    Resumes from ``<dest>.part`` when one exists, retries transient failures with jittered
    backoff within ``config.max_attempts`` and ``config.deadline_s``, and calls
    ``progress(bytes_done, length)`` at most once per chunk. Returns ``dest``.
    """
    expected = sha256.lower()
    if SHA256.fullmatch(expected) is None:
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    part = part_path(dest)
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        have = 0
    plan = plan_request(have, length)
    keep = length if plan == COMPLETE else plan.offset
    _check_disk(dest.parent, missing=length - keep, margin=config.min_free_bytes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.deadline_s
    try:
        async with asyncio.timeout_at(deadline):
            sink = await asyncio.to_thread(_PartFile.open, part, keep, length, config.chunk_bytes)
            try:
                sink.progress = progress
                if sink.done < length:
                    await _fetch(client, url, sink, config, deadline)
                await asyncio.to_thread(sink.finish, dest, expected)
            finally:
                sink.close()
    except TimeoutError:
        raise DownloadUnavailable(
            f"{url} not downloaded within the {config.deadline_s} s deadline"
        ) from None
    except ArtifactMismatch:
        part.unlink(missing_ok=True)
        raise
    log.info("downloaded %s to %s (%s)", url, dest, _human(length))
    return dest


async def _fetch(
    client: httpx.AsyncClient, url: str, sink: _PartFile, config: DownloadConfig, deadline: float
) -> None:
    """Attempt until the part is whole, backing off between transient failures."""
    loop = asyncio.get_running_loop()
    retry = Retry(config.backoff)
    for attempt in range(1, config.max_attempts + 1):
        try:
            await _attempt(client, url, sink, config)
            return
        except DownloadUnavailable as exc:
            if attempt == config.max_attempts:
                raise DownloadUnavailable(
                    f"gave up on {url} after {attempt} attempts "
                    f"({_human(sink.done)} of {_human(sink.length)} kept): {exc}"
                ) from exc
            delay = retry.next_delay()
            if loop.time() + delay >= deadline:
                raise DownloadUnavailable(
                    f"no time left before the deadline to retry {url}: {exc}"
                ) from exc
            log.warning(
                "download of %s failed (%s); attempt %d in %.1f s", url, exc, attempt + 1, delay
            )
            await asyncio.sleep(delay)


async def _attempt(
    client: httpx.AsyncClient, url: str, sink: _PartFile, config: DownloadConfig
) -> None:
    """One request: append what arrives to the part; raise DownloadUnavailable if it ends short."""
    plan = plan_request(sink.done, sink.length)
    if plan == COMPLETE:
        return
    loop = asyncio.get_running_loop()
    stall = config.stall_timeout_s
    try:
        # The timer is pushed back on every read, so it fires only after `stall` seconds of
        # silence, however slow but steady the link.
        async with (
            asyncio.timeout(stall) as timer,
            client.stream("GET", url, headers=plan.headers, timeout=stall) as response,
        ):
            start = check_response(
                response.status_code,
                response.headers.get("content-range"),
                plan.offset,
                sink.length,
                content_length=response.headers.get("content-length"),
            )
            if start == COMPLETE:
                return
            if start != sink.done:
                log.info("%s ignored the range request; starting over from byte 0", url)
                sink.restart()
            async for data in response.aiter_raw():
                timer.reschedule(loop.time() + stall)
                await sink.feed(data)
    except TimeoutError:
        raise DownloadUnavailable(f"no byte from {url} for {stall} s") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise DownloadRejected(f"cannot fetch {url}: {exc}") from exc
    except httpx.TransportError as exc:
        raise DownloadUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        await sink.flush()  # what arrived before a failure is good: keep it to resume from
    if sink.done < sink.length:
        raise DownloadUnavailable(f"{url} ended after {sink.done} of {sink.length} bytes")
