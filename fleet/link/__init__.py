"""The controller's MQTT side: broker auth and ACL, the embedded broker, ingest, publishing.

:class:`DeviceLink` is what the app's lifespan enters (``async with DeviceLink(settings,
engine) as link``); it implements :class:`~fleet.link.port.LinkPort` for the API.
docs/broker.md explains how the brokers are configured and what each one can do.

Importing this package is cheap: the MQTT stack (aiomqtt, amqtt) loads when
:class:`DeviceLink` is first used, so ``fleet.link.port`` costs nothing to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.link.acl import Access, acl_allows
from fleet.link.port import LinkPort, LinkStatus

if TYPE_CHECKING:
    from fleet.link.service import DeviceLink, LinkStats, ReconnectPolicy

__all__ = [
    "Access",
    "DeviceLink",
    "LinkPort",
    "LinkStats",
    "LinkStatus",
    "ReconnectPolicy",
    "acl_allows",
]

_LAZY = {"DeviceLink", "LinkStats", "ReconnectPolicy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fleet.link import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
