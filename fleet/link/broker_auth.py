"""Write the broker's users and their rights, and make the broker reload them.

The rules live in :mod:`fleet.link.acl` (Mosquitto, the embedded broker) and
:mod:`fleet.link.nats_auth` (nats-server); this module does the I/O around them: the
controller's own broker password (configured, or generated once into
``<data_dir>/broker-password``), durable atomic writes into
``settings.resolved_auth_dir`` (:func:`fleet.files.atomic_write`: mode 0600, a broker
never reads half a file), and a SIGHUP to each pid in ``settings.broker_pid_file``.

- ``broker_auth_format`` "mosquitto" writes ``passwd`` and ``acl``. Mosquitto re-reads
  both on SIGHUP and disconnects clients whose user is gone; the embedded broker
  notices the new file by its mtime.
- "nats" writes ``nats-users.conf``, an ``authorization`` block every node of the
  cluster includes. ``broker_pid_file`` may then be a pattern (``/run/nats/*.pid``):
  every node reloads, and closes the connections of users it no longer has.

Everything here blocks: callers on the event loop go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.files import atomic_write
from fleet.link.acl import (
    AuthFileError,
    render_acl_file,
    render_password_file,
    valid_device_entry,
)
from fleet.link.nats_auth import NATS_USERS_FILE, render_nats_users, valid_bcrypt
from fleet.link.passwords import new_password

__all__ = [
    "ACL_FILE",
    "CONTROLLER_PASSWORD_FILE",
    "PASSWORD_FILE",
    "AuthFiles",
    "DeviceCredential",
    "controller_password",
    "load_extra_nats_users",
    "reload_broker",
    "write_auth_files",
]

log = logging.getLogger(__name__)

PASSWORD_FILE = "passwd"  # noqa: S105 - a file name, in settings.resolved_auth_dir
ACL_FILE = "acl"
CONTROLLER_PASSWORD_FILE = "broker-password"  # noqa: S105 - a file name, in data_dir


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """A device's broker login as the database holds it."""

    device_id: str
    password_hash: str  # $7$, for Mosquitto and the embedded broker
    revoked: bool
    bcrypt_hash: str | None = None  # for nats-server; None when enrolled before there was one


@dataclass(frozen=True, slots=True)
class AuthFiles:
    """Where the files went, and what they allow."""

    files: tuple[Path, ...]  # Mosquitto's acl and passwd, or nats-users.conf
    devices: int  # device accounts written (revoked and malformed ones left out)
    reloaded: bool  # every broker named was signalled to reload (and there was one)


def controller_password(settings: FleetSettings) -> str:
    """The controller's broker password: configured, or generated once and kept (0600)."""
    if settings.broker_password is not None:
        return settings.broker_password.get_secret_value()
    path = settings.data_dir / CONTROLLER_PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    password = new_password()
    try:
        atomic_write(path, f"{password}\n".encode(), exclusive=True)
    except FileExistsError:
        # Another process (a second replica on this data_dir) won the race: use its password.
        stored = path.read_text(encoding="utf-8").strip()
        if not stored:
            raise ConfigError(f"{path} exists but is empty; delete it to generate one") from None
        return stored
    log.info("generated the controller's broker password into %s", path)
    return password


def reload_broker(pid_file: Path | None) -> bool:
    """SIGHUP each broker whose pid is in ``pid_file`` or a file its pattern matches.

    False (logged) when there is none, or when one of them could not be signalled.
    """
    if pid_file is None:
        return False
    if not any(char in pid_file.name for char in "*?["):
        return _signal_pid_in(pid_file)
    matches = sorted(pid_file.parent.glob(pid_file.name))
    if not matches:
        log.warning("no broker pid file matches %s: is the broker running?", pid_file)
        return False
    return all([_signal_pid_in(match) for match in matches])  # a list: signal every one


def _signal_pid_in(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
        if pid <= 1:
            raise ValueError(pid)
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        log.warning("broker pid file %s does not exist: is the broker running?", pid_file)
        return False
    except ValueError:
        log.warning("broker pid file %s does not hold a process id", pid_file)
        return False
    except ProcessLookupError:
        log.warning("no broker process with the pid in %s: is the broker running?", pid_file)
        return False
    except PermissionError:
        log.warning("not allowed to signal the broker whose pid is in %s", pid_file)
        return False
    return True


def load_extra_nats_users(path: Path) -> list[dict[str, Any]]:
    """The operator's own NATS logins: a JSON list of nats-server user maps."""
    try:
        users = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"nats_extra_users_file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read nats_extra_users_file {path}: {exc}") from None
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        raise ConfigError(
            f"nats_extra_users_file {path} must hold a JSON list of user maps, like "
            '[{"user": "ops", "password": "$2a$11$...", "permissions": {...}}]'
        )
    return users


def _logins(
    settings: FleetSettings, devices: list[DeviceCredential], *, nats: bool
) -> dict[str, str]:
    """``device id -> hash`` of every device that may log in, in the broker's hash form."""
    entries: dict[str, str] = {}
    unhashed: list[str] = []
    for device in devices:
        if device.revoked:
            continue
        if device.device_id == settings.broker_username:
            log.error(
                "device %r has the controller's broker username; it is left out of the "
                "broker's users",
                device.device_id,
            )
            continue
        hashed = device.bcrypt_hash if nats else device.password_hash
        if hashed is None:
            unhashed.append(device.device_id)
            continue
        if not (valid_bcrypt(hashed) if nats else valid_device_entry(device.device_id, hashed)):
            log.error("device %r has a malformed id or password hash; left out", device.device_id)
            continue
        entries[device.device_id] = hashed
    if unhashed:  # one line per sync, however many there are
        log.warning(
            "%d device(s) enrolled before NATS logins existed cannot log in to NATS until "
            'they enroll again (docs/broker.md, "NATS"): %s',
            len(unhashed),
            ", ".join(unhashed[:5]) + (", ..." if len(unhashed) > 5 else ""),
        )
    return entries


def _render(
    settings: FleetSettings, controller_hash: str, entries: dict[str, str]
) -> dict[str, str]:
    """``file name -> content`` in ``broker_auth_format``, in the order to write them."""
    controller = settings.broker_username
    try:
        if settings.broker_auth_format == "nats":
            extra = settings.nats_extra_users_file
            extra_users = load_extra_nats_users(extra) if extra is not None else []
            users = render_nats_users(controller, controller_hash, entries, extra_users)
            return {NATS_USERS_FILE: users}
        # The ACL never names a device, so it goes first: the new password file is what
        # lets a new device in, or shuts a revoked one out.
        return {
            ACL_FILE: render_acl_file(controller),
            PASSWORD_FILE: render_password_file(controller, controller_hash, entries),
        }
    except AuthFileError as exc:
        raise ConfigError(str(exc)) from None


def write_auth_files(
    settings: FleetSettings, controller_hash: str, devices: list[DeviceCredential]
) -> AuthFiles:
    """Write every non-revoked device's login in ``broker_auth_format``, then reload.

    ``controller_hash`` is the controller's password hashed for that format: ``$7$``
    for Mosquitto, bcrypt for NATS.
    """
    entries = _logins(settings, devices, nats=settings.broker_auth_format == "nats")
    contents = _render(settings, controller_hash, entries)
    auth_dir = settings.resolved_auth_dir
    auth_dir.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        atomic_write(auth_dir / name, content.encode())
    reloaded = reload_broker(settings.broker_pid_file)
    return AuthFiles(tuple(auth_dir / name for name in contents), len(entries), reloaded)
