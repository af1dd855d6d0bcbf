"""Request bodies are bounded in time: a client that announces a body and stalls gets 408.

A real uvicorn server on loopback runs a small app behind the agent's middleware and
error handlers; raw sockets play the slow clients.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from agent.api.app import create_app
from agent.api.errors import install_error_handlers
from agent.api.limits import BodyLimit
from agent.config import AgentSettings
from tests.polling import wait_until

TIMEOUT_S = 0.5


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=1024, read_timeout_s=TIMEOUT_S)
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def slowly() -> AsyncIterator[bytes]:
            for n in range(4):  # lasts longer than the body deadline
                await asyncio.sleep(TIMEOUT_S / 2)
                yield f"chunk {n}\n".encode()

        return StreamingResponse(slowly(), media_type="text/plain")

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(make_app(), log_level="warning", lifespan="off")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    host, port = sock.getsockname()
    wait_until(lambda: running.started, "uvicorn to start", within_s=10, every_s=0.01)
    yield host, port
    running.should_exit = True
    thread.join(timeout=10)


def send_headers(address: tuple[str, int], length: int, first: bytes = b"") -> socket.socket:
    conn = socket.create_connection(address, timeout=10 * TIMEOUT_S)
    head = (
        f"POST /echo HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    conn.sendall(head + first)
    return conn


def read_response(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.endswith(b"}"):
            break
    return data


def test_a_body_that_never_arrives_gets_408_and_others_are_served(
    server: tuple[str, int],
) -> None:
    stalled = send_headers(server, length=100, first=b"{")
    with stalled:
        served = httpx.post(f"http://{server[0]}:{server[1]}/echo", content=b"{}", timeout=10)
        assert served.json() == {"received": 2}
        answer = read_response(stalled)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Request body not received within 0.5 s" in answer


def test_a_slow_body_that_arrives_in_time_is_served(server: tuple[str, int]) -> None:
    body = b'{"padding": "' + b"x" * 50 + b'"}'
    with send_headers(server, length=len(body)) as conn:
        for start in range(0, len(body), 20):
            conn.sendall(body[start : start + 20])
            time.sleep(TIMEOUT_S / 10)  # a slow client, well inside the deadline
        answer = read_response(conn)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"received":%d}' % len(body))


def test_a_streamed_answer_may_outlast_the_body_deadline(server: tuple[str, int]) -> None:
    url = f"http://{server[0]}:{server[1]}/stream"
    with httpx.stream("POST", url, content=b"{}", timeout=10) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert text == "".join(f"chunk {n}\n" for n in range(4))


def test_the_openapi_document_lists_no_framing_headers() -> None:
    """Content-Length and Transfer-Encoding belong to HTTP, not to any operation."""
    spec = create_app(AgentSettings()).openapi()
    headers = {
        parameter["name"].lower()
        for operations in spec["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "header"
    }
    assert not headers & {"content-length", "transfer-encoding", "host", "connection"}
