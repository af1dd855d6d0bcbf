"""A real systemd notify socket for tests: an AF_UNIX datagram socket that collects messages.

It stands where systemd would (``NOTIFY_SOCKET``), abstract (``@name``) by default so no
path length limit bites. Every read has a deadline; :meth:`NotifySocket.quiet_for` is how
a test shows that something stopped (no message for a while, within a deadline).
"""

from __future__ import annotations

import socket
import time
import uuid
from types import TracebackType

__all__ = ["NotifySocket", "parse"]


def parse(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in datagram.decode().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


class NotifySocket:
    """Receives sd_notify datagrams; ``env`` is what to put in NOTIFY_SOCKET."""

    def __init__(self, path: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"edgefleet-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.sock.bind(path)
            self.env = path
        self.seen: list[dict[str, str]] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()

    def receive(self, within_s: float) -> dict[str, str] | None:
        """The next message, or None if none came within ``within_s``."""
        self.sock.settimeout(max(within_s, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = parse(data)
        self.seen.append(message)
        return message

    def wait_for(
        self, key: str, value: str | None = None, within_s: float = 30.0
    ) -> dict[str, str]:
        """The first message carrying ``key`` (with ``value``, if given)."""
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message and value in (None, message[key]):
                return message
        raise AssertionError(
            f"no {key}{'=' + value if value else ''} within {within_s:g} s; saw {self.seen[-10:]}"
        )

    def quiet_for(self, quiet_s: float, key: str, within_s: float = 30.0) -> None:
        """Wait until no ``key`` message arrives for ``quiet_s``; fail if that never happens."""
        deadline = time.monotonic() + within_s
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} kept arriving for {within_s:g} s")
            message = self.receive(quiet_s - (time.monotonic() - last))
            if message is not None and key in message:
                last = time.monotonic()
