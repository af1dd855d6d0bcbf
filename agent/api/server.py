"""uvicorn's server, with the two moments systemd and the app need to hear about.

The app's lifespan runs before uvicorn binds its socket, so it cannot tell by itself when
the API really serves: :class:`NotifyingServer` sets ``listening`` once the socket is
bound (the app then sends READY=1). On SIGTERM or SIGINT it sends STOPPING=1 at once,
before draining requests, which may take ``timeout_graceful_shutdown`` seconds.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn

from agent.systemd import Notifier

__all__ = ["NotifyingServer"]


class NotifyingServer(uvicorn.Server):
    """A :class:`uvicorn.Server` that sets ``listening`` and tells systemd it stops."""

    def __init__(
        self, config: uvicorn.Config, listening: asyncio.Event, notifier: Notifier
    ) -> None:
        super().__init__(config)
        self._listening = listening
        self._notifier = notifier

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._listening.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._notifier.stopping()
        super().handle_exit(sig, frame)
