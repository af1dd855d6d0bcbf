"""sd_notify by hand, against a real AF_UNIX datagram socket, and the watchdog's heartbeat rule.

The stall is injected at the decoder seam (the fake decoder's step gate holds a decode
step, as a hung llama.cpp call would), so the real scheduler thread really stops beating.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.serving.registry import ModelRegistry, ServingLoop
from agent.serving.scheduler import BatchScheduler, GenerationRequest
from agent.systemd import (
    Notifier,
    encode_message,
    keep_watchdog,
    notify_address,
    stale_loops,
    watchdog_timeout_s,
)
from tests.agent.notify_support import NotifySocket
from tests.fakes.decoder import FakeDecoder
from tests.fakes.models import FakeModel
from tests.polling import wait_until


@pytest.fixture
def listener() -> Iterator[NotifySocket]:
    with NotifySocket() as sock:
        yield sock


# -- the pure parts ---------------------------------------------------------------------------


def test_notify_socket_addresses() -> None:
    assert notify_address(None) is None
    assert notify_address("") is None
    assert notify_address("@edgefleet/notify") == "\0edgefleet/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("vsock:2:1234") is None  # not spoken here


def test_the_watchdog_timeout_honours_watchdog_pid() -> None:
    assert watchdog_timeout_s({}, 10) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "30000000"}, 10) == 30.0
    assert watchdog_timeout_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10) == 30.0
    assert watchdog_timeout_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "0"}, 10) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "soon"}, 10) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "x"}, 10) is None


def test_messages_are_key_value_lines_and_status_stays_on_one_line() -> None:
    assert encode_message({"READY": "1", "STATUS": "serving\n  gemma"}) == (
        b"READY=1\nSTATUS=serving gemma\n"
    )
    long = encode_message({"STATUS": "x" * 1000}).decode()
    assert len(long) < 420


def test_stale_loops_are_those_silent_longer_than_the_limit() -> None:
    beats = {"gemma": 100.0, "qwen": 75.0}
    assert stale_loops(beats, now=110.0, limit_s=40.0) == {}
    assert stale_loops(beats, now=110.0, limit_s=20.0) == {"qwen": 35.0}
    assert stale_loops({}, now=1e9, limit_s=1.0) == {}  # no loops (ONNX only): alive


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"}, pid=1)
    assert not notifier.enabled
    assert notifier.watchdog_s is None  # no socket, no watchdog
    assert not notifier.ready("serving")
    assert not notifier.ping()
    asyncio.run(asyncio.wait_for(keep_watchdog(notifier, dict), timeout=5))  # returns at once


# -- real sockets -------------------------------------------------------------------------------


def test_messages_reach_an_abstract_socket(listener: NotifySocket) -> None:
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "77"}, pid=77
    )
    assert notifier.watchdog_s == 30.0
    assert notifier.ready("serving gemma3-270m")
    assert listener.receive(5) == {"READY": "1", "STATUS": "serving gemma3-270m"}
    assert notifier.status("enrolled: active: controller unreachable")
    assert listener.receive(5) == {"STATUS": "enrolled: active: controller unreachable"}
    assert notifier.ping()
    assert listener.receive(5) == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert listener.receive(5) == {"STOPPING": "1", "STATUS": "stopping"}


def test_messages_reach_a_socket_file() -> None:
    folder = tempfile.mkdtemp(prefix="ef-", dir="/tmp")  # AF_UNIX paths: at most 107 bytes
    path = str(Path(folder) / "notify")
    try:
        with NotifySocket(path) as sock:
            assert Notifier.from_env({"NOTIFY_SOCKET": path}).ready()
            assert sock.receive(5) == {"READY": "1"}
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
        Path(folder).rmdir()


def test_a_socket_nobody_listens_on_is_not_an_error() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@edgefleet-test-nobody-listens"})
    assert notifier.enabled
    assert not notifier.ready()  # logged, never raised


# -- the watchdog ---------------------------------------------------------------------------------


class Beats:
    """The serving loops' beats, as the test sets them."""

    def __init__(self) -> None:
        self.stalled = False
        self.since = time.monotonic()

    def __call__(self) -> dict[str, float]:
        return {"gemma": self.since if self.stalled else time.monotonic()}


@contextlib.contextmanager
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread of its own; its tasks are cancelled and awaited on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_pings_stop_while_a_loop_is_stalled_and_resume_when_it_beats(
    listener: NotifySocket,
) -> None:
    notifier = Notifier(notify_address(listener.env), watchdog_s=0.2)  # pings every 0.1 s
    beats = Beats()
    with event_loop_thread() as loop:
        asyncio.run_coroutine_threadsafe(keep_watchdog(notifier, beats), loop)
        for _ in range(3):
            listener.wait_for("WATCHDOG", "1", within_s=10)
        beats.since, beats.stalled = time.monotonic(), True
        listener.quiet_for(1.0, "WATCHDOG")  # 10 intervals without a ping
        beats.stalled = False
        listener.wait_for("WATCHDOG", "1", within_s=10)


def test_the_scheduler_beats_while_idle_and_stops_while_a_decode_step_hangs(
    listener: NotifySocket,
) -> None:
    decoder = FakeDecoder()
    sched = BatchScheduler(decoder, idle_wake_s=0.05)
    registry = ModelRegistry()
    registry.publish("fake", sched)
    registry.publish("onnx", FakeModel(decoder.manifest))  # no loop of its own: not counted
    assert isinstance(sched, ServingLoop)
    assert set(registry.heartbeats()) == {"fake"}
    first = sched.last_beat
    wait_until(lambda: sched.last_beat > first, "an idle scheduler to beat", within_s=10)

    notifier = Notifier(notify_address(listener.env), watchdog_s=0.5)  # pings every 0.25 s
    gate = threading.Event()
    with event_loop_thread() as loop:
        asyncio.run_coroutine_threadsafe(keep_watchdog(notifier, registry.heartbeats), loop)
        listener.wait_for("WATCHDOG", "1", within_s=10)  # idle, yet alive
        decoder.step_gate = gate  # the next decode step hangs until the gate opens

        async def generate() -> str:
            request = GenerationRequest(prompt=decoder.tokenize("abc", special=False), max_tokens=3)
            return (await sched.submit(request).complete()).text

        answer = asyncio.run_coroutine_threadsafe(generate(), loop)
        try:
            listener.quiet_for(1.5, "WATCHDOG")  # three timeouts: the stalled loop stops pings
            assert time.monotonic() - sched.last_beat > 0.5
        finally:
            gate.set()
        assert len(answer.result(timeout=30)) == 3
        listener.wait_for("WATCHDOG", "1", within_s=10)  # beating again: pings resume
    registry.close()
