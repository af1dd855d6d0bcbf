"""Who this device is to the fleet, and everything the link keeps in its state folder.

``<state_dir>`` (0700) holds:

- ``device.key``: the Ed25519 private key (PKCS#8 PEM, 0600). Generated on first
  enrollment, never sent anywhere; only its public half and a signature travel.
- ``identity.json`` (0600): the device id, the controller's URL, the broker
  credentials and the intervals the controller chose, from the enrollment response.
- ``desired.json`` (0600): the last desired state the agent acted on
  (:mod:`agent.state.saved`).
- ``spool.db``: telemetry and events waiting for the broker (:mod:`agent.link.spool`).
- ``tuf/``: the TUF metadata the agent has verified, ``root.json`` its trust anchor;
  ``enrollment-root.json``: the root the controller sent at enrollment.
- ``link.lock``: held while an agent uses the folder.
"""

from __future__ import annotations

import logging
import stat
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.files import atomic_write, ensure_private_dir
from agent.link.errors import IdentityError
from models.topics import DeviceId
from models.wire import BrokerCredentials, EnrollmentResponse

__all__ = ["Identity", "StateDir"]

log = logging.getLogger(__name__)


class Identity(BaseModel):
    """What enrollment gave this device; saved as ``identity.json``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1
    device_id: DeviceId
    fleet_url: str
    broker: BrokerCredentials
    telemetry_interval_s: float = Field(gt=0)  # seconds between telemetry samples
    heartbeat_interval_s: float = Field(gt=0)  # the controller marks us offline after 3 missed
    enrolled_at: AwareDatetime

    @classmethod
    def from_response(cls, fleet_url: str, response: EnrollmentResponse, now: datetime) -> Identity:
        return cls(
            device_id=response.device_id,
            fleet_url=fleet_url,
            broker=response.broker,
            telemetry_interval_s=response.telemetry_interval_s,
            heartbeat_interval_s=response.heartbeat_interval_s,
            enrolled_at=now,
        )


class StateDir:
    """The files under one state folder; creates the folder (0700) on first write."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()

    @property
    def key_path(self) -> Path:
        return self.root / "device.key"

    @property
    def identity_path(self) -> Path:
        return self.root / "identity.json"

    @property
    def desired_path(self) -> Path:
        return self.root / "desired.json"

    @property
    def spool_path(self) -> Path:
        return self.root / "spool.db"

    @property
    def lock_path(self) -> Path:
        return self.root / "link.lock"

    @property
    def enrollment_root_path(self) -> Path:
        """The TUF root the controller sent at enrollment, trusted on first use."""
        return self.root / "enrollment-root.json"

    @property
    def tuf_dir(self) -> Path:
        """TUF metadata the agent has verified; ``root.json`` in it is the trust anchor."""
        return self.root / "tuf"

    def ensure(self) -> Path:
        return ensure_private_dir(self.root)

    # -- identity -----------------------------------------------------------------

    def load_identity(self) -> Identity | None:
        """The saved identity, ``None`` before enrollment; :class:`IdentityError` if unusable."""
        try:
            data = self.identity_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IdentityError(f"cannot read {self.identity_path}: {exc.strerror}") from None
        try:
            return Identity.model_validate_json(data)
        except ValidationError as exc:
            raise IdentityError(
                f"{self.identity_path} is unreadable ({exc.error_count()} errors): remove it "
                "and start again with --fleet URL --token TOKEN to enroll this device anew"
            ) from None

    def save_identity(self, identity: Identity) -> None:
        self.ensure()
        atomic_write(self.identity_path, identity.model_dump_json(indent=2).encode())

    # -- device key ---------------------------------------------------------------

    def device_key(self) -> Ed25519PrivateKey:
        """The device's private key: loaded, or generated and saved (0600) on first use."""
        self.ensure()
        try:
            data = self.key_path.read_bytes()
        except FileNotFoundError:
            return self._create_key()
        except OSError as exc:
            raise IdentityError(f"cannot read {self.key_path}: {exc.strerror}") from None
        mode = stat.S_IMODE(self.key_path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); now 0600", self.key_path, mode)
            self.key_path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(
                f"{self.key_path} is not a usable private key ({exc}): remove it and "
                "enroll again with a new token"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{self.key_path} is not an Ed25519 key: remove it")
        return key

    def _create_key(self) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            atomic_write(self.key_path, pem, exclusive=True)
        except FileExistsError:  # another process won the race: use its key
            return self.device_key()
        log.info("generated this device's key in %s", self.key_path)
        return key
