"""A fake of the controller's MQTT link (:class:`fleet.link.port.LinkPort`) for API tests.

It records every call, and can be told to fail the way the real link fails: a down
broker makes ``publish_desired``/``send_command``/``clear_desired`` raise
``BrokerUnavailable`` and ``status().connected`` read False.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType

from sqlalchemy.engine import Engine

from fleet.config import FleetSettings
from fleet.errors import BrokerUnavailable
from fleet.link.port import LinkPort
from models.wire import Command, DesiredState

__all__ = ["FakeLink", "FakeLinkStatus"]


@dataclass
class FakeLinkStatus:
    connected: bool = True
    broker_url: str = "mqtt://fake-broker:1883"
    embedded_broker: bool = False
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    ingest: str = "mqtt"


@dataclass
class FakeLink:
    """Records calls in order; ``calls`` holds ``(name, argument)`` pairs."""

    broker_down: bool = False
    sync_auth_fails: bool = False
    calls: list[tuple[str, object]] = field(default_factory=list)
    published: list[DesiredState] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    sync_auth_count: int = 0
    entered: int = 0
    exited: int = 0
    settings: FleetSettings | None = None
    engine: Engine | None = None
    stats: FakeLinkStatus = field(default_factory=FakeLinkStatus)

    def factory(self) -> Callable[[FleetSettings, Engine], AbstractAsyncContextManager[LinkPort]]:
        """What ``create_app(link_factory=...)`` takes: hands out this one fake."""

        def make(settings: FleetSettings, engine: Engine) -> FakeLink:
            self.settings, self.engine = settings, engine
            return self

        return make

    async def __aenter__(self) -> FakeLink:
        self.entered += 1
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.exited += 1

    def _check_broker(self, what: str) -> None:
        if self.broker_down:
            raise BrokerUnavailable(f"fake broker is down ({what})")

    async def sync_auth(self) -> None:
        self.calls.append(("sync_auth", None))
        if self.sync_auth_fails:
            raise BrokerUnavailable("fake broker cannot reload its auth files")
        self.sync_auth_count += 1

    async def publish_desired(self, state: DesiredState) -> None:
        self.calls.append(("publish_desired", state))
        self._check_broker("publish_desired")
        self.published.append(state)

    async def clear_desired(self, device_id: str) -> None:
        self.calls.append(("clear_desired", device_id))
        self._check_broker("clear_desired")
        self.cleared.append(device_id)

    async def send_command(self, command: Command) -> None:
        self.calls.append(("send_command", command))
        self._check_broker("send_command")
        self.commands.append(command)

    def status(self) -> FakeLinkStatus:
        self.stats.connected = not self.broker_down
        return self.stats
