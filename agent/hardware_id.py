"""The device's hardware id: what survives a re-flash, so the fleet knows a board again.

x86 boards carry a DMI product UUID (``/sys/class/dmi/id/product_uuid``); Jetsons carry a
serial number in the device tree (``/proc/device-tree/serial-number``, NUL-terminated).
Cheap boards often leave placeholders there (all zeros, ``Not Settable``, ``Default
string``, the AMI sample UUID): those identify nothing and are skipped, so two such boards
never look like one. :func:`hardware_id` (pure) decides from the files' contents;
:func:`read_hardware_id` reads them under a root folder that tests point at a temp dir.

On x86 ``product_uuid`` is readable by root only: an agent running as its own user finds
nothing there unless the image makes it readable (firmware-images/common/tmpfiles.conf).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

__all__ = ["DMI_UUID", "DT_SERIAL", "hardware_id", "read_hardware_id"]

DMI_UUID: Final = "sys/class/dmi/id/product_uuid"
DT_SERIAL: Final = "proc/device-tree/serial-number"

_MIN, _MAX = 8, 128  # what EnrollmentRequest.hardware_id accepts
_PLACEHOLDERS: Final = frozenset(
    {
        "not settable",
        "not specified",
        "not applicable",
        "not available",
        "default string",
        "to be filled by o.e.m.",
        "system serial number",
        "system product name",
        "none",
        "n/a",
        "123456789",
        "0123456789",
        "03000200-0400-0500-0006-000700080009",  # AMI's sample UUID, shipped as is
    }
)
_BLANK = re.compile(r"^(0+|f+)$")  # an unset UUID, once its dashes are gone


def _clean(raw: str | None) -> str | None:
    if raw is None:
        return None
    value = raw.replace("\0", "").strip()
    if not (_MIN <= len(value) <= _MAX) or not value.isprintable():
        return None
    if value.lower() in _PLACEHOLDERS:
        return None
    if _BLANK.match(value.replace("-", "").lower()):  # 0000...0000, FFFF...FFFF
        return None
    return value


def hardware_id(product_uuid: str | None, serial_number: str | None) -> str | None:
    """The first real id among the DMI product UUID and the device-tree serial number."""
    return _clean(product_uuid) or _clean(serial_number)


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes()[: _MAX * 2].decode("utf-8", "replace")
    except OSError:  # absent, or root-only
        return None


def read_hardware_id(root: Path = Path("/")) -> str | None:
    """The hardware id of the device ``root`` belongs to; None if it has none readable."""
    return hardware_id(_read(root / DMI_UUID), _read(root / DT_SERIAL))
