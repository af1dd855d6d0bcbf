"""What the API needs from the MQTT side, as a Protocol so tests can pass a fake link.

:class:`fleet.link.DeviceLink` is the real one (an async context manager the app's
lifespan enters); ``tests/fakes/fleet_link.py`` records calls for API unit tests.
"""

from __future__ import annotations

from typing import Protocol

from models.wire import Command, DesiredState

__all__ = ["LinkPort", "LinkStatus"]


class LinkStatus(Protocol):
    """Counters and state the status API and /readyz show."""

    connected: bool  # the controller's own MQTT session is up
    broker_url: str
    embedded_broker: bool
    received: int  # MQTT messages received since start
    stored: int  # telemetry samples and events written (duplicates excluded)
    duplicates: int  # samples and events already stored, skipped
    rejected: int  # payloads dropped as invalid, oversized, unknown or misaddressed
    ingest: str  # how device messages come in: mqtt, mqtt-shared, jetstream(-waiting)


class LinkPort(Protocol):
    """The calls the API makes on the MQTT side."""

    async def sync_auth(self) -> None:
        """Rewrite the broker's credentials and ACL from the database and make it reload.

        Called after an enrollment (before the response goes out, so the new device
        can connect at once) and after a revocation (which cuts the device off).
        """

    async def publish_desired(self, state: DesiredState) -> None:
        """Publish ``state`` retained at QoS 1; the database already holds it.

        Raises ``BrokerUnavailable`` when the broker is down; the link republishes
        every stored desired state when it reconnects, so nothing is lost.
        """

    async def clear_desired(self, device_id: str) -> None:
        """Remove the retained desired state of a revoked device."""

    async def send_command(self, command: Command) -> None:
        """Publish a one-off command (QoS 1, not retained)."""

    def status(self) -> LinkStatus: ...
