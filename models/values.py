"""Small validated value types both sides share: model names, versions and sha256 digests.

Each is declared once, as a pattern, a compiled regex for plain Python checks and a
pydantic type for messages, so the controller can never accept (and sign) a value
that a device would refuse to store. Device ids and topics live in :mod:`models.topics`.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import StringConstraints

__all__ = [
    "MODEL_NAME",
    "MODEL_NAME_PATTERN",
    "SHA256",
    "SHA256_PATTERN",
    "VERSION",
    "VERSION_PATTERN",
    "ModelName",
    "Sha256",
    "Version",
]

MODEL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MODEL_NAME: Final = re.compile(MODEL_NAME_PATTERN)
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
"""Lower-case, path- and URL-safe: a model name is also a folder and a route segment."""

VERSION_PATTERN: Final = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"
VERSION: Final = re.compile(VERSION_PATTERN)
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
"""A model version label: safe in a folder name, with no leading punctuation."""

SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
SHA256: Final = re.compile(SHA256_PATTERN)
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
"""A sha256 digest as lower-case hex: how artifacts are addressed and checked."""
