"""Who may touch which MQTT topic: one rule set, rendered for Mosquitto and checked by amqtt.

The rules, in full:

- the controller's account (``settings.broker_username``) may publish, subscribe to and
  receive anything under ``edgefleet/v1/`` (including MQTT 5 shared subscriptions
  ``$share/<group>/edgefleet/v1/...``), and nothing outside it;
- a device's account is its device id; it may publish only to its own ``reported``,
  ``telemetry`` and ``events`` topics, and subscribe to and receive only its own
  ``desired`` and ``cmd`` topics, named exactly (no wildcards);
- every other user, and every other topic, is denied.

:func:`acl_allows` is the rule set as a pure function (the embedded broker calls it on
every publish, subscribe and delivery); :func:`render_acl_file` and
:func:`render_password_file` write the same rules in Mosquitto's ``acl_file`` and
``password_file`` formats. Nothing here touches the disk or the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum

from models.topics import DEVICE_ID_PATTERN, TOPIC_PREFIX, Channel

__all__ = [
    "CONTROLLER_ROOT",
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "Access",
    "AuthFileError",
    "acl_allows",
    "parse_password_file",
    "render_acl_file",
    "render_password_file",
    "valid_device_entry",
]

CONTROLLER_ROOT = "edgefleet/v1"
"""Everything the controller may touch lies under this topic level."""

DEVICE_PUBLISHES = frozenset({Channel.REPORTED, Channel.TELEMETRY, Channel.EVENTS})
DEVICE_RECEIVES = frozenset({Channel.DESIRED, Channel.CMD})

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_SHARE = re.compile(r"^\$share/[^/#+]+/(.+)$")
# A hash as passwords.hash_password writes it; nothing that could break a line apart.
_HASH = re.compile(r"^\$7\$[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

_HEADER = (
    "# Written by the edgefleet controller after every enrollment and revocation.\n"
    "# Do not edit: the next sync overwrites it. See docs/broker.md.\n"
)


class Access(StrEnum):
    """What a client wants to do with a topic."""

    READ = "read"  # have a message on this topic delivered to it
    WRITE = "write"  # publish to this topic (its last will included)
    SUBSCRIBE = "subscribe"  # subscribe with this topic filter


class AuthFileError(ValueError):
    """A username or password hash that cannot be written safely into the broker's files."""


def _device_topic(device_id: str, channel: Channel) -> str:
    return f"{TOPIC_PREFIX}/{device_id}/{channel.value}"


def _under_controller_root(topic: str, *, wildcards: bool) -> bool:
    levels = topic.split("/")
    if len(levels) < 2 or levels[0] != "edgefleet" or levels[1] != "v1":
        return False
    if wildcards:
        # '#' only as the whole last level, '+' only as a whole level (MQTT 4.7.1).
        for index, level in enumerate(levels):
            if "#" in level and (level != "#" or index != len(levels) - 1):
                return False
            if "+" in level and level != "+":
                return False
        return True
    return "#" not in topic and "+" not in topic


def acl_allows(username: str | None, topic: str, access: Access, *, controller: str) -> bool:
    """True when ``username`` may do ``access`` with ``topic`` (a filter for SUBSCRIBE).

    ``controller`` is the controller's own account name. ``None`` (an anonymous
    client) and any name that is neither the controller nor a well-formed device id
    are denied everything.
    """
    if not username or not topic or "\x00" in topic:
        return False
    if username == controller:
        if access is Access.SUBSCRIBE:
            shared = _SHARE.match(topic)
            return _under_controller_root(shared[1] if shared else topic, wildcards=True)
        return _under_controller_root(topic, wildcards=False)
    if not _DEVICE_ID.fullmatch(username):
        return False
    allowed = DEVICE_PUBLISHES if access is Access.WRITE else DEVICE_RECEIVES
    return any(topic == _device_topic(username, channel) for channel in allowed)


def _check_username(username: str) -> str:
    if not _USERNAME.fullmatch(username):
        raise AuthFileError(
            f"broker username {username[:80]!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    return username


def render_password_file(controller: str, controller_hash: str, devices: Mapping[str, str]) -> str:
    """Mosquitto's ``password_file``: ``user:hash`` lines, the controller first.

    ``devices`` maps device id to its ``$7$`` hash; the caller leaves revoked devices
    out. Raises :class:`AuthFileError` for a malformed controller entry or a device
    whose id is the controller's name (it would log in as the controller); malformed
    device entries are the caller's to filter (see :func:`valid_device_entry`).
    """
    _check_username(controller)
    if not _HASH.fullmatch(controller_hash):
        raise AuthFileError("the controller's password hash is not in $7$ form")
    lines = [f"{controller}:{controller_hash}"]
    for device_id, hashed in sorted(devices.items()):
        if device_id == controller:
            raise AuthFileError(f"device id {device_id!r} is the controller's broker username")
        if not valid_device_entry(device_id, hashed):
            raise AuthFileError(f"device {device_id[:80]!r}: malformed id or password hash")
        lines.append(f"{device_id}:{hashed}")
    return _HEADER + "\n".join(lines) + "\n"


def valid_device_entry(device_id: str, hashed: str) -> bool:
    """True when a device's id and hash can go into the password file as one safe line."""
    return bool(_DEVICE_ID.fullmatch(device_id) and _HASH.fullmatch(hashed))


def render_acl_file(controller: str) -> str:
    """Mosquitto's ``acl_file`` for the rules above (``pattern`` lines apply to every user)."""
    _check_username(controller)
    lines = [
        f"user {controller}",
        f"topic readwrite {CONTROLLER_ROOT}/#",
        "",
        "# Each device, logged in as its own id (%u), on its own topics only.",
    ]
    lines += [
        f"pattern write {_device_topic('%u', channel)}"
        for channel in Channel
        if channel in DEVICE_PUBLISHES
    ]
    lines += [
        f"pattern read {_device_topic('%u', channel)}"
        for channel in Channel
        if channel in DEVICE_RECEIVES
    ]
    return _HEADER + "\n".join(lines) + "\n"


def parse_password_file(lines: Iterable[str]) -> dict[str, str]:
    """``user -> hash`` from a Mosquitto ``password_file``; comments and junk lines skipped."""
    users: dict[str, str] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if sep and username and hashed:
            users[username] = hashed
    return users
