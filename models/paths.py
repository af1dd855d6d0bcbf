"""The controller's HTTP paths that devices call: part of the protocol, like the topics.

The controller mounts its routes on these and the agent builds its URLs from them, so
the two cannot drift apart. Each is appended to the fleet URL a device enrolled with.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ARTIFACTS_PATH", "ENROLL_PATH", "PROVISION_CHECK_PATH", "TUF_PATH", "artifact_path"]

ENROLL_PATH: Final = "/api/v1/enroll"
"""POST an ``EnrollmentRequest``; the answer is an ``EnrollmentResponse``."""

PROVISION_CHECK_PATH: Final = "/api/v1/enroll/check"
"""POST a ``ProvisionCheckRequest``: is the token good, and what does a device trust."""

TUF_PATH: Final = "/api/v1/tuf"
"""TUF metadata: ``{TUF_PATH}/{N}.root.json``, ``timestamp.json`` and so on."""

ARTIFACTS_PATH: Final = "/api/v1/artifacts"
"""Model artifacts by content address, with HTTP Range: see :func:`artifact_path`."""


def artifact_path(sha256: str) -> str:
    """Where the artifact whose bytes hash to ``sha256`` is served."""
    return f"{ARTIFACTS_PATH}/{sha256}"
