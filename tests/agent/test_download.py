"""The artifact downloader against a real HTTP server that misbehaves on demand.

The server is a tiny threaded ``http.server`` with its own Range support; each test picks
how it behaves and reads back what it sent (per request: Range asked, status, bytes written).
Each handler sets an event when it returns, so byte counts are read only once settled.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import agent.update.download
from agent.backoff import Backoff
from agent.update.download import (
    COMPLETE,
    ArtifactMismatch,
    DownloadConfig,
    DownloadRejected,
    DownloadUnavailable,
    Fetch,
    NotEnoughDisk,
    check_response,
    download,
    part_path,
    plan_request,
)
from scripts.servers import free_port

SIZE = 2 << 20  # 2 MiB
HALF = SIZE // 2
DATA = random.Random(7).randbytes(SIZE)
DIGEST = hashlib.sha256(DATA).hexdigest()
FAST = DownloadConfig(
    chunk_bytes=64 << 10,
    stall_timeout_s=5.0,
    deadline_s=30.0,
    max_attempts=3,
    backoff=Backoff(initial_s=0.01, cap_s=0.05),
    min_free_bytes=0,
)


@dataclass
class Served:
    range: str | None
    status: int = 0
    sent: int = 0
    finished: threading.Event = field(default_factory=threading.Event)


class ArtifactServer(ThreadingHTTPServer):
    """Serves DATA at /artifact; ``mode`` switches the misbehaviour."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.mode = "normal"
        self.served: list[Served] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # lets stalled handlers go at teardown

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/artifact"

    def settled(self) -> list[Served]:
        """What every request got, once every handler has returned."""
        for served in self.served:
            assert served.finished.wait(10), "a handler never finished"
        return self.served


class _Handler(BaseHTTPRequestHandler):
    server: ArtifactServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        served = Served(range=self.headers.get("Range"))
        with srv.lock:
            first = not srv.served
            srv.served.append(served)
        try:
            self._serve(srv.mode, first, served)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (rejection, stall timeout)
        finally:
            served.finished.set()

    def _reply(self, served: Served, status: int, headers: dict[str, str]) -> None:
        served.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _write(self, served: Served, body: bytes) -> None:
        for i in range(0, len(body), 32 << 10):
            piece = body[i : i + (32 << 10)]
            self.wfile.write(piece)
            served.sent += len(piece)

    def _serve(self, mode: str, first: bool, served: Served) -> None:
        if mode == "fail_first" and first:
            self._reply(served, 503, {"Content-Length": "0"})
            return
        data = DATA
        if mode == "flip":
            data = DATA[:HALF] + bytes([DATA[HALF] ^ 1]) + DATA[HALF + 1 :]
        start = 0
        headers: dict[str, str] = {}
        match = re.fullmatch(r"bytes=(\d+)-", served.range or "")
        if match and mode != "ignore_range":
            start = int(match[1])
            if start >= len(data):
                self._reply(served, 416, {"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if mode in ("extra", "extra_undeclared"):
            body += b"\0" * (256 << 10)
        if mode != "extra_undeclared":  # undeclared: HTTP/1.0, the body ends when we close
            headers["Content-Length"] = str(len(body))
        self._reply(served, 206 if "Content-Range" in headers else 200, headers)
        if (mode == "cut_first" and first) or mode == "cut_always":
            self._write(served, body[: len(body) // 2])  # then close: truncated
        elif mode == "trickle":  # slow but steady: a gap shorter than the stall timeout
            for i in range(8):
                if i:
                    time.sleep(0.08)
                self._write(served, body[i * len(body) // 8 : (i + 1) * len(body) // 8])
        elif mode == "stall":
            self._write(served, body[: len(body) // 2])
            srv = self.server
            srv.release.wait()
        else:
            self._write(served, body)


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    srv = ArtifactServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def fetch(
    server: ArtifactServer,
    dest: Path,
    config: DownloadConfig = FAST,
    progress: list[tuple[int, int]] | None = None,
    **kwargs: object,
) -> Path:
    async def go() -> Path:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await download(
                client,
                server.url,
                dest,
                length=kwargs.get("length", SIZE),  # type: ignore[arg-type]
                sha256=kwargs.get("sha256", DIGEST),  # type: ignore[arg-type]
                config=config,
                progress=None if progress is None else lambda d, n: progress.append((d, n)),
            )

    return asyncio.run(go())


# -- the pure decisions ---------------------------------------------------------------------


def test_plan_request_asks_for_the_rest_or_nothing() -> None:
    assert plan_request(0, 100) == Fetch(0)
    assert Fetch(0).headers == {"Accept-Encoding": "identity"}
    assert plan_request(40, 100) == Fetch(40)
    assert Fetch(40).headers["Range"] == "bytes=40-"
    assert plan_request(100, 100) == COMPLETE
    assert plan_request(0, 0) == COMPLETE
    assert plan_request(150, 100) == Fetch(0)  # cannot be a prefix: start over


def test_check_response_says_where_the_body_starts() -> None:
    assert check_response(200, None, 0, 100) == 0
    assert check_response(200, None, 40, 100) == 0  # range ignored: caller restarts
    assert check_response(206, "bytes 40-99/100", 40, 100, content_length="60") == 40
    assert check_response(206, "bytes 40-99/*", 40, 100) == 40
    assert check_response(416, "bytes */100", 100, 100) == COMPLETE
    assert check_response(416, None, 100, 100) == COMPLETE


@pytest.mark.parametrize(
    ("status", "content_range", "offset", "content_length", "error", "words"),
    [
        (206, "bytes 0-99/100", 40, None, DownloadRejected, "starting at 0"),
        (206, None, 40, None, DownloadRejected, "unreadable"),
        (206, "bytes */100", 40, None, DownloadRejected, "without a byte range"),
        (206, "bytes 40-119/120", 40, None, ArtifactMismatch, "not the signed length"),
        (200, None, 0, "120", ArtifactMismatch, "longer than the signed length"),
        (206, "bytes 40-99/100", 40, "80", ArtifactMismatch, "longer than the signed length"),
        (200, None, 0, "90", ArtifactMismatch, "shorter"),
        (416, "bytes */60", 60, None, ArtifactMismatch, "cannot serve"),
        (404, None, 0, None, DownloadRejected, "404"),
        (503, None, 0, None, DownloadUnavailable, "503"),
        (429, None, 0, None, DownloadUnavailable, "429"),
    ],
)
def test_check_response_refuses_what_cannot_be_the_artifact(
    status: int,
    content_range: str | None,
    offset: int,
    content_length: str | None,
    error: type[Exception],
    words: str,
) -> None:
    with pytest.raises(error, match=words) as caught:
        check_response(status, content_range, offset, 100, content_length=content_length)
    if error is DownloadRejected:
        assert not isinstance(caught.value, ArtifactMismatch)


def test_errors_form_two_roots() -> None:
    assert issubclass(ArtifactMismatch, DownloadRejected)
    assert issubclass(NotEnoughDisk, DownloadRejected)
    assert not issubclass(DownloadUnavailable, DownloadRejected)


def test_nonsense_config_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        DownloadConfig(chunk_bytes=0)
    with pytest.raises(ValueError, match="stall_timeout_s"):
        DownloadConfig(stall_timeout_s=0)


def test_public_api() -> None:
    assert sorted(agent.update.download.__all__) == [
        "ArtifactMismatch",
        "COMPLETE",
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


# -- against the real server ----------------------------------------------------------------


def test_full_download_verifies_reports_progress_and_renames(
    server: ArtifactServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model.gguf"
    progress: list[tuple[int, int]] = []
    assert fetch(server, dest, progress=progress, sha256=DIGEST.upper()) == dest
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    done = [d for d, _ in progress]
    assert done == sorted(done)
    assert done[-1] == SIZE
    assert all(n == SIZE for _, n in progress)
    steps = [b - a for a, b in zip([0, *done], done, strict=False)]
    assert all(step >= FAST.chunk_bytes for step in steps[:-1])  # at most once per chunk
    assert len(progress) <= SIZE // FAST.chunk_bytes
    [served] = server.settled()
    assert (served.range, served.status, served.sent) == (None, 200, SIZE)


def test_resume_after_a_cut_fetches_only_the_missing_half(
    server: ArtifactServer, tmp_path: Path
) -> None:
    server.mode = "cut_first"
    dest = tmp_path / "model.gguf"
    fetch(server, dest)
    assert dest.read_bytes() == DATA
    first, second = server.settled()
    assert (first.status, first.sent) == (200, HALF)
    assert (second.range, second.status, second.sent) == (f"bytes={HALF}-", 206, SIZE - HALF)


def test_a_part_left_by_an_earlier_run_is_rehashed_and_resumed(
    server: ArtifactServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model.gguf"
    kept = 3 * SIZE // 4 + 123  # not on a chunk boundary
    part_path(dest).write_bytes(DATA[:kept])
    fetch(server, dest)
    assert dest.read_bytes() == DATA
    [served] = server.settled()
    assert (served.range, served.sent) == (f"bytes={kept}-", SIZE - kept)


def test_server_ignoring_range_restarts_from_zero_and_verifies(
    server: ArtifactServer, tmp_path: Path
) -> None:
    server.mode = "ignore_range"
    dest = tmp_path / "model.gguf"
    part_path(dest).write_bytes(b"\xff" * (SIZE // 3))  # appended to, the hash would fail
    fetch(server, dest)
    assert dest.read_bytes() == DATA
    [served] = server.settled()
    assert (served.range, served.status, served.sent) == (f"bytes={SIZE // 3}-", 200, SIZE)


@pytest.mark.parametrize("mode", ["extra", "extra_undeclared"])
def test_longer_than_the_signed_length_is_rejected_without_writing_extra(
    server: ArtifactServer, tmp_path: Path, mode: str
) -> None:
    server.mode = mode
    dest = tmp_path / "model.gguf"
    progress: list[tuple[int, int]] = []
    with pytest.raises(ArtifactMismatch, match="longer than the signed length"):
        fetch(server, dest, progress=progress)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert max((d for d, _ in progress), default=0) <= SIZE
    assert len(server.settled()) == 1  # rejected: never retried


def test_flipped_byte_is_rejected_and_the_part_removed(
    server: ArtifactServer, tmp_path: Path
) -> None:
    server.mode = "flip"
    dest = tmp_path / "model.gguf"
    with pytest.raises(ArtifactMismatch, match="does not match"):
        fetch(server, dest)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert len(server.settled()) == 1


def test_stall_gives_up_quickly_and_keeps_the_part(server: ArtifactServer, tmp_path: Path) -> None:
    server.mode = "stall"
    dest = tmp_path / "model.gguf"
    config = DownloadConfig(
        chunk_bytes=64 << 10,
        stall_timeout_s=0.3,
        max_attempts=2,
        backoff=Backoff(initial_s=0.01, cap_s=0.01),
        min_free_bytes=0,
    )
    began = time.monotonic()
    with pytest.raises(DownloadUnavailable, match="no byte") as caught:
        fetch(server, dest, config)
    assert time.monotonic() - began < 5
    assert "after 2 attempts" in str(caught.value)
    assert not dest.exists()
    assert 0 < part_path(dest).stat().st_size < SIZE  # kept to resume
    assert server.served[0].range is None
    assert server.served[1].range == f"bytes={HALF}-"  # resumed where the first stalled


def test_slow_but_steady_is_not_a_stall(server: ArtifactServer, tmp_path: Path) -> None:
    server.mode = "trickle"  # 8 pieces 0.08 s apart: 0.56 s in all, never 0.25 s silent
    dest = tmp_path / "model.gguf"
    fetch(server, dest, DownloadConfig(stall_timeout_s=0.25, max_attempts=1, min_free_bytes=0))
    assert dest.read_bytes() == DATA
    assert len(server.settled()) == 1


def test_deadline_bounds_the_whole_download(server: ArtifactServer, tmp_path: Path) -> None:
    server.mode = "stall"
    config = DownloadConfig(stall_timeout_s=30, deadline_s=0.3, min_free_bytes=0)
    began = time.monotonic()
    with pytest.raises(DownloadUnavailable, match="deadline"):
        fetch(server, tmp_path / "model.gguf", config)
    assert time.monotonic() - began < 5


def test_truncation_every_time_gives_up_after_max_attempts(
    server: ArtifactServer, tmp_path: Path
) -> None:
    server.mode = "cut_always"
    dest = tmp_path / "model.gguf"
    with pytest.raises(DownloadUnavailable, match="after 3 attempts"):
        fetch(server, dest)
    served = server.settled()
    assert len(served) == FAST.max_attempts
    assert part_path(dest).stat().st_size == sum(s.sent for s in served)  # all kept, in order


def test_server_error_is_retried(server: ArtifactServer, tmp_path: Path) -> None:
    server.mode = "fail_first"
    dest = tmp_path / "model.gguf"
    fetch(server, dest)
    assert dest.read_bytes() == DATA
    assert [s.status for s in server.settled()] == [503, 200]


def test_not_enough_disk_is_rejected_before_any_request(
    server: ArtifactServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model.gguf"
    config = DownloadConfig(min_free_bytes=1 << 62)
    with pytest.raises(NotEnoughDisk, match=r"need .* available") as caught:
        fetch(server, dest, config)
    assert caught.value.needed == SIZE + (1 << 62)
    assert caught.value.available < caught.value.needed
    assert server.served == []
    assert not part_path(dest).exists()


def test_disk_check_counts_only_the_missing_bytes(
    server: ArtifactServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "model.gguf"
    part_path(dest).write_bytes(DATA[:HALF])
    real = agent.update.download.shutil.disk_usage

    def exactly_enough(path: object) -> object:
        usage = real(path)  # type: ignore[arg-type]
        return usage._replace(free=SIZE - HALF + 1000)

    monkeypatch.setattr(agent.update.download.shutil, "disk_usage", exactly_enough)
    fetch(server, dest, DownloadConfig(min_free_bytes=1000))
    assert dest.read_bytes() == DATA


def test_complete_part_is_verified_and_renamed_without_refetching(
    server: ArtifactServer, tmp_path: Path
) -> None:
    # A Range request from SIZE would get 416 here; a complete part needs no request at all.
    dest = tmp_path / "model.gguf"
    part_path(dest).write_bytes(DATA)
    fetch(server, dest)
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    assert server.served == []


def test_complete_but_wrong_part_is_deleted_so_the_next_run_starts_clean(
    server: ArtifactServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model.gguf"
    part_path(dest).write_bytes(b"\0" * SIZE)
    with pytest.raises(ArtifactMismatch):
        fetch(server, dest)
    assert not part_path(dest).exists()
    fetch(server, dest)
    assert dest.read_bytes() == DATA
