"""Write the broker's password and ACL files, and make the broker reload them.

The rules live in :mod:`fleet.link.acl`; this module does the I/O around them: the
controller's own broker password (configured, or generated once into
``<data_dir>/broker-password``), durable atomic writes of ``passwd`` and ``acl`` into
``settings.resolved_auth_dir`` (:func:`fleet.files.atomic_write`: mode 0600, a broker
never reads half a file), and a SIGHUP to the pid in
``settings.broker_pid_file``. Mosquitto re-reads both files on SIGHUP and disconnects
clients whose user is gone; the embedded broker notices the new file by its mtime.
Everything here blocks: callers on the event loop go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.files import atomic_write
from fleet.link.acl import (
    AuthFileError,
    render_acl_file,
    render_password_file,
    valid_device_entry,
)
from fleet.link.passwords import new_password

__all__ = [
    "ACL_FILE",
    "CONTROLLER_PASSWORD_FILE",
    "PASSWORD_FILE",
    "AuthFiles",
    "DeviceCredential",
    "controller_password",
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
    password_hash: str
    revoked: bool


@dataclass(frozen=True, slots=True)
class AuthFiles:
    """Where the files went, and what they allow."""

    password_file: Path
    acl_file: Path
    devices: int  # device accounts written (revoked and malformed ones left out)
    reloaded: bool  # a broker was signalled to reload


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
    """SIGHUP the broker whose pid is in ``pid_file``; False (logged) when there is none."""
    if pid_file is None:
        return False
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


def write_auth_files(
    settings: FleetSettings, controller_hash: str, devices: list[DeviceCredential]
) -> AuthFiles:
    """Render and write ``passwd`` and ``acl`` for every non-revoked device, then reload."""
    entries: dict[str, str] = {}
    for device in devices:
        if device.revoked:
            continue
        if device.device_id == settings.broker_username:
            log.error(
                "device %r has the controller's broker username; it is left out of the "
                "password file",
                device.device_id,
            )
            continue
        if not valid_device_entry(device.device_id, device.password_hash):
            log.error("device %r has a malformed id or password hash; left out", device.device_id)
            continue
        entries[device.device_id] = device.password_hash
    try:
        passwd = render_password_file(settings.broker_username, controller_hash, entries)
        acl = render_acl_file(settings.broker_username)
    except AuthFileError as exc:
        raise ConfigError(str(exc)) from None
    auth_dir = settings.resolved_auth_dir
    password_file = auth_dir / PASSWORD_FILE
    acl_file = auth_dir / ACL_FILE
    auth_dir.mkdir(parents=True, exist_ok=True)
    # The ACL never names a device, so write it first: the new password file is what
    # lets a new device in, or shuts a revoked one out.
    atomic_write(acl_file, acl.encode())
    atomic_write(password_file, passwd.encode())
    reloaded = reload_broker(settings.broker_pid_file)
    return AuthFiles(password_file, acl_file, len(entries), reloaded)
