"""Provision a device image: stamp a fleet URL, a token and the fleet's trust anchors into it.

``edgefleet-agent provision TARGET --fleet URL --token T`` works on a root filesystem
(a mounted image partition, an unpacked rootfs, NVIDIA's ``Linux_for_Tegra/rootfs``)
with edgefleet installed, before the device first boots:

1. TARGET must look like a root filesystem with edgefleet in it (:func:`check_layout`);
2. the token comes from ``--token``, or row ``--index`` of a ``tokens.csv`` written by
   ``edgefleet tokens create --out`` (:func:`token_from_csv`);
3. the controller is asked whether the token would enroll, without spending a use of
   it (``POST`` :data:`models.paths.PROVISION_CHECK_PATH`); it answers with its TUF root
   and the broker's CA. A refusal says why (unknown, used, expired, revoked); no answer
   is an error too. Nothing is written unless the check passes;
4. :func:`plan_files` (pure) decides the files, which are then written atomically:
   ``etc/edgefleet/root.json`` (0644), ``etc/edgefleet/broker-ca.pem`` (0644, only when
   the broker has a CA; a stale one is removed) and ``etc/edgefleet/provision.env``
   (0640, group ``edgefleet``), the unit's ``EnvironmentFile``, holding the
   ``EDGEFLEET_AGENT_FLEET__*`` settings. Provisioning again replaces them.

The trust anchors beat trust on first use: the agent verifies TUF metadata from the
provisioned root and the broker's TLS with the provisioned CA, never with what the
network sent at enrollment. The token is the only secret written, readable by root and
the agent's group only; it is spent when the device enrolls.

Errors are the link's (:mod:`agent.link.errors`): a bad target or token source, or a
controller certificate this machine does not trust, is
:class:`~agent.errors.ConfigError`, a refused token
:class:`~agent.link.errors.EnrollmentRejected` (both rejected: fix and run again), no
answer :class:`~agent.link.errors.LinkUnavailable` (transient: run again later).
"""

from __future__ import annotations

import csv
import io
import os
import re
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from pydantic import ValidationError
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from agent.config import LinkSettings
from agent.errors import ConfigError
from agent.files import atomic_file
from agent.link.enroll import error_reason, os_error, token_advice, transport_reason
from agent.link.errors import EnrollmentRejected, LinkUnavailable
from models.paths import PROVISION_CHECK_PATH
from models.wire import ProvisionCheckRequest, ProvisionCheckResponse

__all__ = [
    "BROKER_CA",
    "ENV_FILE",
    "REQUIRED",
    "ROOT_JSON",
    "FileToWrite",
    "ProvisionPlan",
    "Provisioned",
    "check_layout",
    "check_token",
    "env_file",
    "explain_check_refusal",
    "group_id",
    "plan_files",
    "provision",
    "resolve_token",
    "token_from_csv",
    "token_source_problem",
]

# where things are on the device (the image builder and the systemd unit rely on these)
ROOT_JSON: Final = "etc/edgefleet/root.json"
BROKER_CA: Final = "etc/edgefleet/broker-ca.pem"
ENV_FILE: Final = "etc/edgefleet/provision.env"
IDENTITY: Final = "var/lib/edgefleet/agent/identity.json"
AGENT_GROUP: Final = "edgefleet"
_OS: Final = ("etc/os-release", "usr")
_EDGEFLEET: Final = ("opt/edgefleet/bin/edgefleet-agent", "etc/edgefleet")
REQUIRED: Final = (*_OS, *_EDGEFLEET)
_NEW_TOKEN: Final = "create a new one with `edgefleet tokens create` and provision again"  # noqa: S105 - advice
_PLAIN: Final = re.compile(r"^[A-Za-z0-9_./:@%+=,-]*$")  # needs no quoting in an EnvironmentFile


@dataclass(frozen=True)
class FileToWrite:
    """One file to put in the image: where (relative to TARGET), what, its mode and group."""

    path: str
    data: bytes
    mode: int
    gid: int | None = None  # None: whatever the writer's is (root's, when run as root)


@dataclass(frozen=True)
class ProvisionPlan:
    """What provisioning does to TARGET."""

    write: tuple[FileToWrite, ...]
    remove: tuple[str, ...]  # stale files from an earlier provisioning


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` did, for the CLI to print."""

    target: Path
    fleet_url: str
    check: ProvisionCheckResponse
    written: tuple[FileToWrite, ...]
    removed: tuple[str, ...]
    warnings: tuple[str, ...]


# --- pure decisions -------------------------------------------------------------------------


def check_layout(target: str, present: Collection[str]) -> None:
    """Refuse a TARGET that is not a root filesystem with edgefleet installed; name what lacks."""
    for path in _OS:
        if path not in present:
            raise ConfigError(
                f"{target} is not a root filesystem: no {path} (pass the folder that holds "
                "etc/, usr/ and opt/, e.g. the mounted partition or Linux_for_Tegra/rootfs)"
            )
    for path in _EDGEFLEET:
        if path not in present:
            raise ConfigError(
                f"{target} has no edgefleet installed: no {path} (build the image with "
                "scripts/build-image, which installs the agent in /opt/edgefleet)"
            )


def token_from_csv(text: str, index: int, source: str) -> str:
    """The secret of row ``index`` of a ``tokens.csv`` (index,token_id,secret,group,expires_at)."""
    if index < 1:
        raise ConfigError(f"--index {index}: token indexes start at 1")
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if not {"index", "secret"} <= columns:
        raise ConfigError(
            f"{source} is not a tokens file: its header must name index and secret columns "
            "(write one with `edgefleet tokens create --count N --out tokens.csv`)"
        )
    seen: list[int] = []
    for row in reader:
        try:
            number = int((row.get("index") or "").strip())
        except ValueError:
            continue
        seen.append(number)
        if number == index:
            secret = (row.get("secret") or "").strip()
            if not secret:
                raise ConfigError(f"{source}: the token with index {index} has no secret")
            return secret
    held = f"it holds {min(seen)} to {max(seen)}" if seen else "it holds no tokens"
    raise ConfigError(f"{source} has no token with index {index} ({held})")


def token_source_problem(token: str | None, tokens: Path | None, index: int | None) -> str | None:
    """Why the options do not name exactly one token; None when they do."""
    if token is not None and (tokens is not None or index is not None):
        return "give --token, or --tokens with --index, not both"
    if token is None and tokens is None and index is not None:
        return "--index needs --tokens tokens.csv"
    if token is None and tokens is None:
        return (
            "no token: give --token TOKEN, or --tokens tokens.csv --index N (an admin "
            "creates them with `edgefleet tokens create`)"
        )
    if tokens is not None and index is None:
        return "--tokens needs --index N: which row of the file this device gets"
    if token is not None and not token.strip():
        return "--token is empty"
    return None


def group_id(group_file: str | None, name: str = AGENT_GROUP) -> int:
    """The gid of group ``name`` in an ``/etc/group`` text; 0 (root) if it is not there."""
    for line in (group_file or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name:
            try:
                return int(fields[2])
            except ValueError:
                return 0
    return 0


def _env_value(value: str) -> str:
    if "\n" in value or "\0" in value:
        raise ConfigError("a provisioned value may not contain a newline")
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def env_file(
    fleet_url: str, token: str, check: ProvisionCheckResponse, *, broker_ca: bool
) -> bytes:
    """``provision.env`` in systemd's EnvironmentFile syntax: the agent's fleet settings."""
    values = {
        "EDGEFLEET_AGENT_FLEET__URL": fleet_url,
        "EDGEFLEET_AGENT_FLEET__TOKEN": token,
        "EDGEFLEET_AGENT_FLEET__TRUST_ROOT": "/" + ROOT_JSON,
    }
    if broker_ca:
        values["EDGEFLEET_AGENT_FLEET__BROKER_CA"] = "/" + BROKER_CA
    about = f"token {check.token_id}"
    if check.group:
        about += f", group {check.group}"
    if check.expires_at is not None:
        about += f", expires {check.expires_at.isoformat()}"
    lines = [
        "# Written by `edgefleet-agent provision`; read by edgefleet-agent.service",
        f"# ({about}). Provision again to replace it.",
        *(f"{key}={_env_value(value)}" for key, value in values.items()),
    ]
    return ("\n".join(lines) + "\n").encode()


def _root_json(tuf_root: str, fleet_url: str) -> bytes:
    """The TUF root as bytes, if it is root metadata its own keys sign; else refused.

    The device would refuse it at first boot; refusing it here shows it on the bench.
    """
    data = tuf_root.encode()
    try:
        root = Metadata[Root].from_bytes(data)
        if not isinstance(root.signed, Root):
            raise ValueError(f"it is {root.signed.type} metadata")
        root.verify_delegate(Root.type, root)
    except (RepositoryError, ValueError) as exc:
        raise ConfigError(
            f"the fleet at {fleet_url} sent a TUF root that cannot be trusted ({exc}): check "
            "that --fleet is the controller's https:// URL and that the agent and controller "
            "versions match"
        ) from None
    return data


def plan_files(
    fleet_url: str, token: str, check: ProvisionCheckResponse, gid: int
) -> ProvisionPlan:
    """The files provisioning writes, and the stale one it removes; pure."""
    has_ca = bool(check.broker_ca_pem and check.broker_ca_pem.strip())
    write = [FileToWrite(ROOT_JSON, _root_json(check.tuf_root, fleet_url), 0o644)]
    if has_ca:
        assert check.broker_ca_pem is not None
        write.append(FileToWrite(BROKER_CA, check.broker_ca_pem.encode(), 0o644))
    write.append(
        FileToWrite(ENV_FILE, env_file(fleet_url, token, check, broker_ca=has_ca), 0o640, gid)
    )
    return ProvisionPlan(tuple(write), () if has_ca else (BROKER_CA,))


def explain_check_refusal(status: int, body: bytes, fleet_url: str) -> str:
    """What the controller said about the token, and what to do about it."""
    reason = error_reason(body) or f"HTTP {status}"
    if status == 404:
        hint = (
            f"{fleet_url} has no {PROVISION_CHECK_PATH} endpoint: check --fleet (the "
            "controller's URL) and that the controller is recent enough to provision devices"
        )
    elif status == 422:
        hint = "check that the agent and controller versions match"
    else:
        hint = token_advice(reason, _NEW_TOKEN) or f"ask the fleet admin, or {_NEW_TOKEN}"
    return f"the fleet at {fleet_url} refused the token (HTTP {status}): {reason}; {hint}"


# --- the shell ------------------------------------------------------------------------------


def resolve_token(token: str | None, tokens: Path | None, index: int | None) -> str:
    """The one token the options name (``--token``, or ``--tokens`` row ``--index``)."""
    problem = token_source_problem(token, tokens, index)
    if problem is not None:
        raise ConfigError(problem)
    if token is not None:
        return token.strip()
    assert tokens is not None
    assert index is not None
    try:
        text = tokens.read_text(encoding="utf-8-sig")  # a spreadsheet may add a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the tokens file {tokens}: {exc}") from None
    return token_from_csv(text, index, str(tokens))


def check_token(
    fleet_url: str,
    token: str,
    *,
    timeout_s: float = 15.0,
    transport: httpx.BaseTransport | None = None,
) -> ProvisionCheckResponse:
    """Ask the controller whether ``token`` would enroll (no use is spent); its answer."""
    url = fleet_url + PROVISION_CHECK_PATH
    try:
        request = ProvisionCheckRequest(token=token)
    except ValidationError:
        raise ConfigError(
            f"that is not an enrollment token ({len(token)} characters): check it was copied whole"
        ) from None
    try:
        with httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False) as client:
            response = client.post(url, json=request.model_dump(mode="json"))
    except httpx.HTTPError as exc:
        unreachable = f"cannot reach the fleet at {fleet_url}: {transport_reason(exc)}"
        if isinstance(os_error(exc), ssl.SSLError):  # trying again will not help
            raise ConfigError(
                f"{unreachable}; if the controller's certificate comes from a private CA, run "
                "with SSL_CERT_FILE=that-ca.pem"
            ) from None
        raise LinkUnavailable(
            f"{unreachable}; check the URL and that the controller runs"
        ) from None
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise LinkUnavailable(
            f"the fleet at {fleet_url} answered HTTP {status} "
            f"({error_reason(response.content) or 'no reason'}); try again shortly"
        )
    if 300 <= status < 400:
        raise EnrollmentRejected(
            f"{url} redirects (HTTP {status}) to {response.headers.get('location', '?')}: "
            "pass the final URL with --fleet",
            status=status,
        )
    if status >= 400:
        raise EnrollmentRejected(
            explain_check_refusal(status, response.content, fleet_url), status=status
        )
    try:
        return ProvisionCheckResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise EnrollmentRejected(
            f"the fleet at {fleet_url} sent an answer this agent cannot read "
            f"({exc.error_count()} errors): check that the agent and controller versions match",
            status=status,
        ) from None


def _present(target: Path) -> set[str]:
    # lexists: an image's etc/os-release is often a link to ../usr/lib/os-release, and an
    # absolute link would point into the host, not the image
    return {path for path in REQUIRED if os.path.lexists(target / path)}


def _write(target: Path, plan: ProvisionPlan) -> tuple[str, ...]:
    """Write the plan's files; the stale ones actually removed."""
    folder = target / "etc" / "edgefleet"
    if folder.is_symlink():
        raise ConfigError(f"{folder} is a symbolic link: refusing to write through it")
    for item in plan.write:
        path = target / item.path
        try:
            with atomic_file(path, mode=item.mode) as tmp:
                tmp.write_bytes(item.data)
                if item.gid is not None and tmp.stat().st_gid != item.gid:
                    os.chown(tmp, -1, item.gid)
        except PermissionError as exc:
            raise ConfigError(
                f"cannot write {path}: {exc.strerror}; run provision as root (sudo)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    removed = []
    for stale in plan.remove:
        try:
            (target / stale).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot remove the stale {target / stale}: {exc}") from None
        removed.append(stale)
    return tuple(removed)


def provision(
    target: Path,
    fleet_url: str,
    token: str,
    *,
    timeout_s: float = 15.0,
    transport: httpx.BaseTransport | None = None,
) -> Provisioned:
    """Check TARGET and the token, then write the files; see the module docstring."""
    try:
        url = LinkSettings(url=fleet_url).url
    except ValueError as exc:
        raise ConfigError(f"--fleet: {_first_line(exc)}") from None
    assert url is not None
    if not target.is_dir():
        what = "is a file, not a folder" if target.exists() else "does not exist"
        raise ConfigError(
            f"{target} {what}: pass the image's root filesystem, e.g. its root partition "
            "mounted (sudo mount -o loop,offset=...) or its rootfs tarball unpacked"
        )
    check_layout(str(target), _present(target))
    check = check_token(url, token, timeout_s=timeout_s, transport=transport)
    try:
        groups = (target / "etc" / "group").read_text(errors="replace")
    except OSError:
        groups = None
    plan = plan_files(url, token, check, group_id(groups))
    warnings = []
    if os.path.lexists(target / IDENTITY):
        warnings.append(
            f"{target / IDENTITY} exists: this image is already enrolled, so the device "
            "ignores the new token; remove var/lib/edgefleet/agent/ from the image to enroll anew"
        )
    removed = _write(target, plan)
    return Provisioned(target, url, check, plan.write, removed, tuple(warnings))


def _first_line(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in exc.errors())
    return str(exc).splitlines()[0]
