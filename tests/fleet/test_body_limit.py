"""Request bodies are bounded in time: a client that announces a body and stalls gets 408.

The controller's real app (SQLite, a fake link) runs under a real uvicorn server on a
free port, with a body deadline of half a second; raw sockets play the slow clients.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import SecretStr

from fleet.api.errors import install_error_handlers
from fleet.api.limits import BodyLimit
from fleet.app import create_app
from fleet.config import FleetSettings
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN, ADMIN_TOKEN
from tests.polling import wait_until

TIMEOUT_S = 0.5
GGUF_CHUNK = b"GGUF" + b"\x01" * 996


@contextmanager
def serving(app: Any) -> Iterator[tuple[str, int]]:
    """``app`` on a real uvicorn server, on a port of its own; its address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn stopped while starting"
        return server.started

    wait_until(
        started, "uvicorn to start (the app's lifespan on its thread)", within_s=60, every_s=0.01
    )
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], Path]]:
    data = tmp_path_factory.mktemp("controller")
    settings = FleetSettings(
        data_dir=data, admin_token=SecretStr(ADMIN_TOKEN), body_timeout_s=TIMEOUT_S
    )
    with serving(create_app(settings, FakeLink().factory())) as address:
        yield address, settings.resolved_artifact_dir


def send_head(address: tuple[str, int], path: str, length: int, content_type: str) -> socket.socket:
    conn = socket.create_connection(address, timeout=10 * TIMEOUT_S)
    conn.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: fleet\r\nAuthorization: {ADMIN['Authorization']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()
    )
    return conn


def answered(conn: socket.socket) -> bool:
    """Whether the server has sent something (an answer) on ``conn`` yet."""
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable)


def read_response(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one response (the server sends a Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def test_a_body_that_never_arrives_gets_408_and_others_are_served(
    controller: tuple[tuple[str, int], Path],
) -> None:
    address, _ = controller
    started = time.monotonic()
    with send_head(address, "/api/v1/enroll", 100, "application/json") as stalled:
        stalled.sendall(b'{"token": ')
        served = httpx.get(f"http://{address[0]}:{address[1]}/healthz", timeout=10)
        assert served.status_code == 200
        status, body = read_response(stalled)
    elapsed = time.monotonic() - started
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert "did not arrive within 0.5 s" in body["error"]["message"]
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 5


def test_a_buffered_body_must_arrive_whole_in_time(
    controller: tuple[tuple[str, int], Path],
) -> None:
    """Never pausing long, a JSON body trickled over twice the deadline is still refused."""
    address, _ = controller
    body = b'{"name": "lab", "description": "' + b"x" * 30 + b'"}'
    sent = 0
    with send_head(address, "/api/v1/groups", len(body), "application/json") as conn:
        while sent < len(body) and not answered(conn):
            conn.sendall(body[sent : sent + 1])
            sent += 1
            time.sleep(TIMEOUT_S / 10)  # a trickle: never a pause as long as the deadline
        status, answer = read_response(conn)
    assert (status, answer["error"]["code"]) == (408, "request_timeout")
    assert sent < len(body)


def test_a_stalled_upload_gets_408_and_leaves_no_temporary_file(
    controller: tuple[tuple[str, int], Path],
) -> None:
    address, artifacts = controller
    path = "/api/v1/models/stalled/versions/1.0.0"
    with send_head(address, path, 10 * len(GGUF_CHUNK), "application/octet-stream") as conn:
        conn.sendall(GGUF_CHUNK)
        status, body = read_response(conn)
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert list((artifacts / "tmp").iterdir()) == []


def test_a_slow_but_steady_upload_is_stored(controller: tuple[tuple[str, int], Path]) -> None:
    """An upload streams: it may take many deadlines in all, as long as it keeps moving."""
    address, _ = controller
    chunks = 8
    path = "/api/v1/models/steady/versions/1.0.0"
    started = time.monotonic()
    with send_head(address, path, chunks * len(GGUF_CHUNK), "application/octet-stream") as conn:
        for _ in range(chunks):
            conn.sendall(GGUF_CHUNK)
            time.sleep(TIMEOUT_S / 3)
        status, body = read_response(conn)
    assert time.monotonic() - started > 2 * TIMEOUT_S
    assert status == 201, body
    assert body["size_bytes"] == chunks * len(GGUF_CHUNK)


def streaming_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, timeout_s=TIMEOUT_S)
    install_error_handlers(app)

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def slowly() -> AsyncIterator[bytes]:
            for n in range(4):  # lasts longer than the body deadline
                await asyncio.sleep(TIMEOUT_S / 2)
                yield f"chunk {n}\n".encode()

        return StreamingResponse(slowly(), media_type="text/plain")

    return app


def test_a_streamed_answer_may_outlast_the_body_deadline() -> None:
    """Once the body is complete, waiting for the client's disconnect is not timed."""
    with serving(streaming_app()) as (host, port):
        url = f"http://{host}:{port}/stream"
        with httpx.stream("POST", url, content=b"{}", timeout=10) as response:
            assert response.status_code == 200
            text = response.read().decode()
    assert text == "".join(f"chunk {n}\n" for n in range(4))


def test_the_openapi_document_lists_no_framing_headers(tmp_path: Path) -> None:
    """Content-Length and Transfer-Encoding belong to HTTP, not to any operation."""
    spec = create_app(FleetSettings(data_dir=tmp_path)).openapi()
    parameters = {
        parameter["name"].lower()
        for operations in spec["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
    }
    assert not parameters & {"content-length", "transfer-encoding", "host", "connection"}
