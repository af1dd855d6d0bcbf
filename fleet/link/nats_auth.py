"""The rules of :mod:`fleet.link.acl`, written as nats-server users for NATS's MQTT gateway.

NATS sees MQTT topic ``a/b`` as subject ``a.b``. Beside its own topics, every MQTT login
needs ``$MQTT.sub.>``: a QoS 1 subscription is a JetStream consumer that delivers to
``$MQTT.sub.<nuid>``, which the client subscribes to itself. Devices may log in over
MQTT only (``allowed_connection_types``): a NATS client could subscribe to other
clients' ``$MQTT.sub.`` subjects, which the gateway refuses over MQTT. The controller
also logs in over NATS, to pull device messages from JetStream
(:mod:`fleet.link.jetstream`).

:func:`render_nats_users` writes one ``authorization`` block, which the node's own
configuration includes (docs/broker.md, "NATS"). Passwords go in as bcrypt hashes
(:func:`fleet.link.passwords.hash_bcrypt`), or, for tests, as they are. Nothing here
touches the disk or the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fleet.link.acl import CONTROLLER_ROOT, DEVICE_PUBLISHES, DEVICE_RECEIVES, AuthFileError
from models.topics import DEVICE_ID_PATTERN, TOPIC_PREFIX, Channel

__all__ = [
    "JETSTREAM_INGEST_PUBLISH",
    "MQTT_INTERNAL_SUBSCRIBE",
    "NATS_USERS_FILE",
    "controller_user",
    "device_user",
    "render_nats_users",
    "valid_bcrypt",
]

NATS_USERS_FILE = "nats-users.conf"

MQTT_INTERNAL_SUBSCRIBE = ("$MQTT.sub.>",)
# What JetStream ingest asks of the JetStream API on the gateway's stream: read and
# create its consumers, pull, acknowledge. The replies come to "_INBOX.>".
JETSTREAM_INGEST_PUBLISH = (
    "$JS.API.CONSUMER.INFO.$MQTT_msgs.*",
    "$JS.API.CONSUMER.DURABLE.CREATE.$MQTT_msgs.*",
    "$JS.API.CONSUMER.MSG.NEXT.$MQTT_msgs.*",
    "$JS.ACK.$MQTT_msgs.>",
)

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_BCRYPT = re.compile(r"^\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}$")
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

_HEADER = (
    "# Written by the edgefleet controller after every enrollment and revocation.\n"
    '# Do not edit: the next sync overwrites it. See docs/broker.md, "NATS".\n'
)


def _subject(topic: str) -> str:
    return topic.replace("/", ".")


def controller_user(name: str, secret: str) -> dict[str, Any]:
    """Everything under ``edgefleet/v1/``, and JetStream ingest, over MQTT or NATS."""
    root = f"{_subject(CONTROLLER_ROOT)}.>"
    return {
        "user": name,
        "password": secret,
        "permissions": {
            "publish": {"allow": [root, *JETSTREAM_INGEST_PUBLISH]},
            "subscribe": {"allow": [root, *MQTT_INTERNAL_SUBSCRIBE, "_INBOX.>"]},
        },
    }


def device_user(device_id: str, secret: str) -> dict[str, Any]:
    """Its own ``reported``, ``telemetry`` and ``events`` out; its ``desired`` and ``cmd`` in."""
    own = _subject(f"{TOPIC_PREFIX}/{device_id}")
    return {
        "user": device_id,
        "password": secret,
        "permissions": {
            "publish": {"allow": [f"{own}.{c.value}" for c in Channel if c in DEVICE_PUBLISHES]},
            "subscribe": {
                "allow": [
                    *(f"{own}.{c.value}" for c in Channel if c in DEVICE_RECEIVES),
                    *MQTT_INTERNAL_SUBSCRIBE,
                ]
            },
        },
        "allowed_connection_types": ["MQTT"],
    }


def valid_bcrypt(hashed: str) -> bool:
    return bool(_BCRYPT.fullmatch(hashed))


def render_nats_users(
    controller: str,
    controller_secret: str,
    devices: Mapping[str, str],
    extra: Sequence[Mapping[str, Any]] = (),
) -> str:
    """An ``authorization`` block: the controller, then each device, then ``extra`` users.

    ``devices`` maps device id to its password's bcrypt hash; the caller leaves revoked
    devices out. ``extra`` are the operator's own logins (``nats_extra_users_file``), as
    nats-server user maps. Raises :class:`AuthFileError` for a malformed name or hash,
    or for a name given twice: one login could otherwise take another's place.
    """
    if not _USERNAME.fullmatch(controller):
        raise AuthFileError(f"broker username {controller[:80]!r} is not a valid NATS user name")
    users = [controller_user(controller, controller_secret)]
    for device_id, hashed in sorted(devices.items()):
        if not _DEVICE_ID.fullmatch(device_id) or not valid_bcrypt(hashed):
            raise AuthFileError(f"device {device_id[:80]!r}: malformed id or bcrypt hash")
        users.append(device_user(device_id, hashed))
    for user in extra:
        name = user.get("user")
        if not isinstance(name, str) or not _USERNAME.fullmatch(name):
            raise AuthFileError(f"an extra NATS user needs a valid 'user' name, not {name!r}")
        users.append(dict(user))
    names = [user["user"] for user in users]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise AuthFileError(f"NATS user names given twice: {', '.join(twice)}")
    # NATS reads JSON values; quoted, "$2a$..." and "$MQTT.sub.>" are never variables.
    return _HEADER + "authorization: " + json.dumps({"users": users}, indent=2) + "\n"
