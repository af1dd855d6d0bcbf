"""systemd's notify protocol, by hand: READY, STATUS, STOPPING and the watchdog.

The unit runs the agent with ``Type=notify`` and ``WatchdogSec=``. systemd passes
``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and, with a watchdog,
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``: only that process may ping). The protocol is one
AF_UNIX datagram per message, ``KEY=value`` lines (sd_notify(3)); a few lines of code,
so no libsystemd binding. Without ``NOTIFY_SOCKET`` every call is a no-op, and a send
that fails is logged, never raised: systemd's bookkeeping must not stop serving.

The watchdog pings (:func:`keep_watchdog`) prove more than a live event loop: they go
out only while every model's serving loop has beaten within the watchdog's timeout
(:func:`stale_loops`, pure). A scheduler thread hung in a decode step stops the pings,
and systemd restarts the agent; a model that is merely busy still beats between steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

__all__ = [
    "Notifier",
    "encode_message",
    "keep_watchdog",
    "notify_address",
    "stale_loops",
    "watchdog_timeout_s",
]

log = logging.getLogger(__name__)

_MAX_STATUS: Final = 400  # characters of a STATUS= line (systemctl status shows one line)


def notify_address(value: str | None) -> str | None:
    """Where ``NOTIFY_SOCKET`` points, as an AF_UNIX address; None if unset or unsupported.

    ``@name`` is Linux's abstract namespace (a leading NUL byte); an absolute path is a
    socket file. Other forms (``vsock:``) are not spoken here.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_timeout_s(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog's timeout in seconds, if systemd expects pings from process ``pid``."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None  # the watchdog is another process's (a parent that forked us)
        except ValueError:
            return None
    return usec / 1_000_000


def encode_message(fields: Mapping[str, str]) -> bytes:
    """``KEY=value`` lines; a value is kept on one line (a newline would start a new key)."""
    lines = []
    for key, value in fields.items():
        one_line = " ".join(value.split()) if key == "STATUS" else value.replace("\n", " ")
        if key == "STATUS" and len(one_line) > _MAX_STATUS:
            one_line = one_line[: _MAX_STATUS - 1] + "…"
        lines.append(f"{key}={one_line}")
    return ("\n".join(lines) + "\n").encode()


def stale_loops(beats: Mapping[str, float], now: float, limit_s: float) -> dict[str, float]:
    """The serving loops whose last beat is older than ``limit_s``, with their age (s)."""
    return {name: now - beat for name, beat in beats.items() if now - beat > limit_s}


class Notifier:
    """Sends notifications to systemd; every method is a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None  # the timeout (s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET")
        address = notify_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a socket path or @name: not notifying", raw)
        return cls(address, watchdog_timeout_s(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, fields: Mapping[str, str]) -> bool:
        """Send one message; True if systemd's socket took it."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(encode_message(fields), self.address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", ",".join(fields), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = {"READY": "1"}
        if status:
            fields["STATUS"] = status
        return self.notify(fields)

    def status(self, text: str) -> bool:
        return self.notify({"STATUS": text})

    def stopping(self) -> bool:
        return self.notify({"STOPPING": "1", "STATUS": "stopping"})

    def ping(self) -> bool:
        return self.notify({"WATCHDOG": "1"})


async def keep_watchdog(
    notifier: Notifier,
    beats: Callable[[], Mapping[str, float]],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ping the watchdog at half its timeout while every serving loop beats; runs until cancelled.

    ``beats`` maps each serving loop (one per GGUF model) to the ``clock()`` time of its
    last iteration. A loop silent for longer than the timeout stops the pings; they
    resume if it beats again before systemd acts.
    """
    timeout = notifier.watchdog_s
    if timeout is None:
        return
    interval = timeout / 2
    stalled: set[str] = set()
    while True:
        stale = stale_loops(beats(), clock(), timeout)
        if not stale:
            if stalled:
                log.warning("serving loops beat again; pinging the watchdog again")
            stalled = set()
            notifier.ping()
        elif set(stale) != stalled:
            stalled = set(stale)
            ages = ", ".join(f"{name} ({age:.0f} s)" for name, age in sorted(stale.items()))
            log.error(
                "serving loop stalled: %s; not pinging the watchdog, so systemd restarts the agent",
                ages,
            )
        await asyncio.sleep(interval)
