"""The link's errors, on the agent's one tree (:mod:`agent.errors`).

    AgentError
    ├── Rejected
    │   └── ConfigError
    │       ├── EnrollmentRejected   the controller refused the enrollment: never retry as is
    │       └── IdentityError        the state folder holds an unreadable or foreign identity
    └── Transient
        └── LinkUnavailable          the controller or broker cannot be reached: retry

httpx, aiomqtt, sqlite3 and OS errors are translated at the module that meets them.
"""

from __future__ import annotations

from agent.errors import ConfigError, Transient

__all__ = ["EnrollmentRejected", "IdentityError", "LinkUnavailable"]


class LinkUnavailable(Transient):
    """The controller's API or the broker did not answer; the same call may work later."""


class EnrollmentRejected(ConfigError):
    """The controller answered and said no (403, 422, ...); retrying cannot help."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.http_status = status


class IdentityError(ConfigError):
    """``identity.json`` or ``device.key`` cannot be used; the message says what to do."""
