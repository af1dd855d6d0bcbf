"""The controller's MQTT side: broker auth and ACL, the embedded broker, ingest, publishing.

:class:`DeviceLink` is what the app's lifespan enters (``async with DeviceLink(settings,
engine, sign_desired=...) as link``); it implements :class:`~fleet.link.port.LinkPort`
for the API. docs/broker.md explains how the brokers are configured and what each one
can do. The modules, by job:

- :mod:`.device_link`: :class:`DeviceLink`, which owns the parts below;
- :mod:`.session`: the aiomqtt client: connect, subscribe, reconnect, acknowledge;
- :mod:`.publish`: signed desired states and commands out, republished on reconnect;
- :mod:`.router`: messages in: parse (:mod:`.ingest`), check the sender, buffer for the
  batch writer (:mod:`.writer`, :mod:`.store`);
- :mod:`.housekeeping`: presence (offline after three missed heartbeats) and retention;
- :mod:`.broker_auth`, :mod:`.acl`, :mod:`.passwords`, :mod:`.embedded`: who may log in
  and what each login may touch.

Importing this package is cheap: the MQTT stack (aiomqtt, amqtt) loads when
:class:`DeviceLink` is first used, so ``fleet.link.port`` costs nothing to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.link.acl import Access, acl_allows
from fleet.link.backoff import ReconnectPolicy
from fleet.link.port import LinkPort, LinkStatus

if TYPE_CHECKING:
    from fleet.link.device_link import DeviceLink, LinkStats

__all__ = [
    "Access",
    "DeviceLink",
    "LinkPort",
    "LinkStats",
    "LinkStatus",
    "ReconnectPolicy",
    "acl_allows",
]

_LAZY = {"DeviceLink", "LinkStats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fleet.link import device_link

        return getattr(device_link, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
