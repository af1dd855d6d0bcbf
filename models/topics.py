"""MQTT topic names: one place builds them, one place parses them.

Every device has five channels under ``edgefleet/v1/devices/{device_id}/``. The
``v1`` is the topic layout's version; a breaking change to it gets a new prefix so
old and new agents can share a broker during a migration. Device ids are a small
validated value type because an id holding ``/``, ``+`` or ``#`` would turn a topic
into a wildcard and let one device reach another's topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import StringConstraints

__all__ = [
    "CHANNEL_POLICIES",
    "DEVICE_ID_PATTERN",
    "TOPIC_PREFIX",
    "Channel",
    "ChannelPolicy",
    "DeviceId",
    "DeviceTopic",
    "TopicError",
    "shared_subscription",
    "subscription",
    "validate_device_id",
]

TOPIC_PREFIX = "edgefleet/v1/devices"
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
"""A device id as it appears in payloads: lower-case letters, digits and dashes."""


class TopicError(ValueError):
    """A topic or device id that is not part of the edgefleet layout."""


class Channel(StrEnum):
    """The last segment of a device topic."""

    DESIRED = "desired"
    REPORTED = "reported"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    CMD = "cmd"


@dataclass(frozen=True)
class ChannelPolicy:
    """How a channel is published, and why (docs/protocol.md is generated from this)."""

    qos: Literal[0, 1, 2]
    retain: bool
    direction: Literal["to_device", "from_device"]
    why: str


CHANNEL_POLICIES: dict[Channel, ChannelPolicy] = {
    Channel.DESIRED: ChannelPolicy(
        1,
        True,
        "to_device",
        "Retained so a device that connects, or reconnects after months, gets its latest "
        "desired state at once; QoS 1 because it must arrive, and duplicates are harmless "
        "(the agent ignores versions it has already applied).",
    ),
    Channel.REPORTED: ChannelPolicy(
        1,
        True,
        "from_device",
        "Retained so a restarted controller learns every device's actual state from the "
        "broker without asking; QoS 1, and a duplicate only overwrites the same state.",
    ),
    Channel.TELEMETRY: ChannelPolicy(
        1,
        False,
        "from_device",
        "QoS 1 with the agent's on-disk spool gives at-least-once delivery, and ids in "
        "every sample make ingest idempotent, so each sample is stored exactly once. "
        "Not retained: an old sample is history, not state.",
    ),
    Channel.EVENTS: ChannelPolicy(
        1,
        False,
        "from_device",
        "Online, offline (the MQTT last will) and model events; QoS 1 and spooled like "
        "telemetry, stored once by id. Not retained.",
    ),
    Channel.CMD: ChannelPolicy(
        1,
        False,
        "to_device",
        "One-off requests (report now, reconcile now). Not retained, so a command is "
        "never replayed to a device that reconnects later; QoS 1 so a connected device "
        "gets it.",
    ),
}


def validate_device_id(value: str) -> str:
    """Return ``value`` if it is a well-formed device id; raise :class:`TopicError` if not."""
    if not _DEVICE_ID.fullmatch(value):
        raise TopicError(
            f"invalid device id {value[:80]!r}: use 3-63 lower-case letters, digits and dashes"
        )
    return value


@dataclass(frozen=True)
class DeviceTopic:
    """One device's channel: ``edgefleet/v1/devices/{device_id}/{channel}``."""

    device_id: str
    channel: Channel

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)

    def __str__(self) -> str:
        return f"{TOPIC_PREFIX}/{self.device_id}/{self.channel.value}"

    @property
    def policy(self) -> ChannelPolicy:
        return CHANNEL_POLICIES[self.channel]

    @classmethod
    def parse(cls, topic: str) -> DeviceTopic:
        """Split a concrete topic into device id and channel, or raise :class:`TopicError`."""
        prefix = TOPIC_PREFIX + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic[:120]!r} is not under {TOPIC_PREFIX}/")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise TopicError(f"topic {topic[:120]!r} is not {TOPIC_PREFIX}/<device>/<channel>")
        device_id, channel = parts
        try:
            return cls(device_id, Channel(channel))
        except ValueError as exc:
            raise TopicError(f"topic {topic[:120]!r}: {exc}") from None


def subscription(channel: Channel) -> str:
    """The filter matching ``channel`` of every device (what the controller subscribes to)."""
    return f"{TOPIC_PREFIX}/+/{channel.value}"


def shared_subscription(group: str, channel: Channel) -> str:
    """An MQTT 5 shared subscription, spreading one channel's messages across replicas."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", group):
        raise TopicError(f"invalid shared-subscription group {group!r}")
    return f"$share/{group}/{subscription(channel)}"
