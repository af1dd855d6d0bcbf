"""Rows for devices, groups and enrollment tokens."""

from __future__ import annotations

import base64
import hashlib
import random
from datetime import datetime
from typing import Any

from fleet.simulate.seed.config import DAY, MINUTE
from fleet.simulate.seed.plan import _Fleet


def _password_hash(rng: random.Random) -> str:
    """Mosquitto's ``$7$`` PBKDF2-SHA512 form of a password nobody knows (as enrollment)."""
    salt = rng.randbytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", rng.randbytes(24), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _device_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = []
    for device in fleet.devices:
        rng = random.Random(f"{fleet.config.seed}:{device.index}:keys")  # noqa: S311
        report = device.hardware.report(device.name, device.agent_version).model_copy(
            update={"timezone": device.zone, "probed_at": device.enrolled_at - MINUTE}
        )
        reported = fleet.reported_state(device)
        rows.append(
            {
                "id": device.id,
                "name": device.name,
                "group": device.group,
                "public_key": base64.b64encode(rng.randbytes(32)).decode(),
                "token_id": fleet.tokens[device.group],
                "mqtt_password_hash": _password_hash(rng),
                "agent_version": device.agent_version,
                "device_report": report.model_dump(mode="json"),
                "enrolled_at": device.enrolled_at,
                "revoked_at": device.revoked_at,
                "online": device.standing == "online",
                "last_seen": device.last_seen,
                "desired_version": device.desired_version(),
                "desired": fleet.desired_state(device),
                "reported": reported,
                "reported_at": (
                    datetime.fromisoformat(reported["reported_at"]) if reported else None
                ),
                "telemetry_dropped": device.dropped,
            }
        )
    return rows


def _group_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    first: dict[str, datetime] = {}
    for device in fleet.devices:
        first.setdefault(device.group, device.enrolled_at)
    rows = []
    for name, zone, _, _ in fleet.groups:
        role, site = name.split("-", 1)
        created = first.get(name, fleet.now - 400 * DAY) - DAY
        rows.append(
            {
                "name": name,
                "description": f"{role} devices at {site} ({zone})",
                "created_at": created,
            }
        )
    return rows


def _token_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    used: dict[str, int] = {}
    for device in fleet.devices:
        used[device.group] = used.get(device.group, 0) + 1
    rows = []
    for name, *_ in fleet.groups:
        token = fleet.tokens[name]
        total = max(100, 2 * used.get(name, 0))
        rows.append(
            {
                "id": token,
                "secret_sha256": hashlib.sha256(
                    f"{fleet.config.seed}/{token}".encode()
                ).hexdigest(),
                "group": name,
                "uses_total": total,
                "uses_left": total - used.get(name, 0),
                "created_at": fleet.now - 400 * DAY,
                "expires_at": None,
                "revoked_at": None,
                "note": f"provisioning {name}",
            }
        )
    return rows
