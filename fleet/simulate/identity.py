"""A simulated device's identity: its Ed25519 key, its enrollment, its broker credentials.

Enrolling is the expensive part of a simulation (the controller hashes a broker
password and rewrites the broker's password file each time), so identities can be
kept in a state directory, one small JSON file per device index, and reused by the
next run. Files are written durably and atomically with mode 0600: they hold private keys and
broker passwords. Several simulator processes may share one directory because each
writes only the indices it runs (``--shard``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.files import atomic_write
from models import trust
from models.device import DeviceReport
from models.trust import sign_enrollment
from models.wire import BrokerCredentials, EnrollmentRequest, b64

__all__ = [
    "SimulatedIdentity",
    "device_name",
    "enrollment_request",
    "identity_path",
    "load_identity",
    "new_private_key",
    "public_key_b64",
    "save_identity",
]

_FORMAT = 1


def device_name(index: int) -> str:
    """The human name (and hostname) simulated device ``index`` enrolls with."""
    return f"sim-{index:05d}"


def new_private_key() -> bytes:
    """A fresh Ed25519 private key, raw 32 bytes."""
    return Ed25519PrivateKey.generate().private_bytes_raw()


def public_key_b64(private_key: bytes) -> str:
    return trust.public_key_b64(Ed25519PrivateKey.from_private_bytes(private_key))


def enrollment_request(
    *,
    token: str,
    private_key: bytes,
    name: str,
    agent_version: str,
    device: DeviceReport,
    now: datetime,
) -> EnrollmentRequest:
    """The signed request a device with ``private_key`` sends to enroll at ``now``."""
    key = Ed25519PrivateKey.from_private_bytes(private_key)
    return sign_enrollment(
        key, token, name=name, agent_version=agent_version, device=device, now=now
    )


@dataclass(frozen=True)
class SimulatedIdentity:
    """One enrolled simulated device, as kept between runs."""

    index: int
    device_id: str
    private_key: bytes = field(repr=False)
    broker: BrokerCredentials = field(repr=False)
    fleet_url: str  # the controller it enrolled with; another controller means re-enrolling
    next_seq: int = 0  # telemetry sequence numbers keep growing across runs

    def with_seq(self, next_seq: int) -> SimulatedIdentity:
        return replace(self, next_seq=next_seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "index": self.index,
            "device_id": self.device_id,
            "private_key": b64(self.private_key),
            "broker": self.broker.model_dump(mode="json", exclude_none=True),
            "fleet_url": self.fleet_url,
            "next_seq": self.next_seq,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimulatedIdentity:
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown identity format {data.get('format')!r}")
        return cls(
            index=int(data["index"]),
            device_id=str(data["device_id"]),
            private_key=base64.b64decode(data["private_key"], validate=True),
            broker=BrokerCredentials.model_validate(data["broker"]),
            fleet_url=str(data["fleet_url"]),
            next_seq=int(data.get("next_seq", 0)),
        )


def identity_path(state_dir: Path, index: int) -> Path:
    return state_dir / f"{device_name(index)}.json"


def save_identity(state_dir: Path, identity: SimulatedIdentity) -> None:
    """Write ``identity`` durably and atomically, mode 0600 (it holds a private key)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(identity_path(state_dir, identity.index), json.dumps(identity.to_json()).encode())


def load_identity(state_dir: Path, index: int, fleet_url: str) -> SimulatedIdentity | None:
    """Device ``index``'s saved identity for ``fleet_url``; None when there is none.

    A file for another controller, or one that cannot be read, counts as none: the
    device enrolls again and the file is replaced.
    """
    try:
        data = json.loads(identity_path(state_dir, index).read_text())
        identity = SimulatedIdentity.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if identity.fleet_url != fleet_url.rstrip("/") or identity.index != index:
        return None
    return identity
