"""What an image's root filesystem has installed: Debian packages and Python distributions.

Both lists are read from files in the root filesystem (dpkg's status database, the
``*.dist-info/METADATA`` of a site-packages folder), never by running anything in it, so
an arm64 root is read on an amd64 build server the same way. The same lists go into the
signed manifest and the SBOM. Names and versions are validated here because they end up
in a requirements list and in package URLs, where a stray space or option would change
what the line means.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from fleet.errors import ImageRejected

__all__ = [
    "DebianPackage",
    "PythonPackage",
    "debian_packages_from_status",
    "distro_from_os_release",
    "python_packages_from_site",
]

# Debian policy 5.6.1 / 5.6.12, and PEP 508 names with PEP 440-ish versions (no spaces,
# no ';', no leading '-', so a requirements line can only ever be `name==version`).
DebName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9+.-]{0,127}$")]
DebVersion = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+~:-]{1,128}$")]
DebArch = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
PyName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
]
PyVersion = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")]


class DebianPackage(BaseModel):
    """One installed Debian package, as dpkg records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: DebName
    version: DebVersion
    arch: DebArch


class PythonPackage(BaseModel):
    """One installed Python distribution, as its METADATA names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: PyName
    version: PyVersion


def _paragraphs(text: str) -> list[dict[str, str]]:
    """deb822 paragraphs as {field: first line}; continuation lines are not needed here."""
    paragraphs: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                paragraphs.append(fields)
            fields = {}
        elif not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
    return paragraphs


def debian_packages_from_status(status_file: Path) -> list[DebianPackage]:
    """The packages a root filesystem's ``var/lib/dpkg/status`` lists as installed.

    Removed packages whose configuration files remain (``deinstall ok config-files``) and
    half-installed ones are left out: they install no programs. Sorted by name and arch.
    """
    try:
        text = status_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageRejected(f"cannot read the dpkg status file {status_file}: {exc}") from None
    found: set[DebianPackage] = set()
    for fields in _paragraphs(text):
        if fields.get("status", "").split()[-1:] != ["installed"]:
            continue
        try:
            found.add(
                DebianPackage(
                    name=fields.get("package", ""),
                    version=fields.get("version", ""),
                    arch=fields.get("architecture", ""),
                )
            )
        except ValidationError as exc:
            name = fields.get("package", "?")
            raise ImageRejected(f"{status_file}: package {name!r} is malformed: {exc}") from None
    return sorted(found, key=lambda p: (p.name, p.arch, p.version))


def _metadata_fields(text: str) -> dict[str, str]:
    """The core metadata headers (RFC 822 style) before the first blank line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        if not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def python_packages_from_site(site_packages: Path) -> list[PythonPackage]:
    """The distributions installed in ``site_packages``, from each ``*.dist-info/METADATA``.

    For a venv inside a root filesystem whose Python cannot run on the build machine;
    sorted by normalised name (PEP 503), then version.
    """
    found: set[PythonPackage] = set()
    for metadata in sorted(site_packages.glob("*.dist-info/METADATA")):
        try:
            fields = _metadata_fields(metadata.read_text(encoding="utf-8"))
            found.add(PythonPackage(name=fields.get("name", ""), version=fields.get("version", "")))
        except (OSError, UnicodeDecodeError, ValidationError) as exc:
            raise ImageRejected(f"{metadata}: not a readable package metadata: {exc}") from None
    return sorted(found, key=lambda p: (re.sub(r"[-_.]+", "-", p.name).lower(), p.version))


def distro_from_os_release(os_release: Path) -> str:
    """The package URL ``distro`` qualifier of a root filesystem: ``debian-12``, ``ubuntu-22.04``.

    Read from its ``etc/os-release`` (or ``usr/lib/os-release``): ``ID`` and ``VERSION_ID``.
    """
    try:
        text = os_release.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageRejected(f"cannot read {os_release}: {exc}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    distro, version = values.get("ID", ""), values.get("VERSION_ID", "")
    if not re.fullmatch(r"[a-z0-9._-]+", distro) or not re.fullmatch(r"[A-Za-z0-9._-]+", version):
        raise ImageRejected(f"{os_release} names no distribution (ID and VERSION_ID)")
    return f"{distro}-{version}"
