"""Every error the fleet controller raises, in one tree.

    FleetError
    ├── Rejected                 the request or message can never succeed as sent
    │   ├── InvalidInput         400/422, malformed or out of range
    │   ├── EnrollmentRejected   403, token unknown, used, expired or revoked; bad proof
    │   ├── Unauthorized         401, missing or wrong admin token (or device credentials)
    │   ├── Forbidden            403, known but not allowed (a revoked device)
    │   ├── NotFound             404, no such device, group or token
    │   ├── Conflict             409, the name is taken or the state moved on
    │   ├── TooLarge             413, an upload over the configured limit
    │   ├── MessageRejected      an MQTT payload that fails validation (logged, dropped)
    │   ├── ConfigError          the controller cannot work as configured: an operator must act
    │   └── ImageRejected        a firmware image or recipe fails its checks (bad signature,
    │                            a changed file, an unknown recipe); names what failed
    └── Transient                may succeed later: retry with backoff
        ├── BrokerUnavailable    the MQTT broker cannot be reached
        ├── DatabaseUnavailable  the database cannot be reached
        ├── ImageBuildFailed     a command of an image build failed (mirror, network, tools)
        ├── StorageUnavailable   the artifact store cannot be written (disk full, I/O error)
        ├── ArtifactCorrupt      a stored file no longer matches its address (quarantined)
        └── RateLimited          429, too many failed sign-ins: wait ``retry_after_s``

Third-party exceptions (SQLAlchemy, paho, OS errors) are translated at the boundary.
"""

from __future__ import annotations

__all__ = [
    "ArtifactCorrupt",
    "BrokerUnavailable",
    "ConfigError",
    "Conflict",
    "DatabaseUnavailable",
    "EnrollmentRejected",
    "FleetError",
    "Forbidden",
    "ImageBuildFailed",
    "ImageRejected",
    "InvalidInput",
    "MessageRejected",
    "NotFound",
    "RateLimited",
    "Rejected",
    "StorageUnavailable",
    "TooLarge",
    "Transient",
    "Unauthorized",
]


class FleetError(Exception):
    """Root of the controller's errors; ``status`` maps it onto HTTP."""

    status: int = 500
    code: str = "internal_error"


class Rejected(FleetError):
    """The request or message can never succeed as sent: do not retry."""

    status = 400
    code = "rejected"


class InvalidInput(Rejected):
    """Malformed or out of range; ``field`` names the offending field, dotted, when known."""

    status = 422
    code = "invalid_input"

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(f"invalid {field}: {message}" if field else message)
        self.field = field


class EnrollmentRejected(Rejected):
    """The token or the proof of key possession is not acceptable."""

    status = 403
    code = "enrollment_rejected"


class Unauthorized(Rejected):
    """Missing or wrong admin token (or device credentials)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "", *, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.challenge = challenge  # the WWW-Authenticate value sent with the 401


class Forbidden(Rejected):
    """The caller is known but not allowed: a revoked device."""

    status = 403
    code = "forbidden"


class NotFound(Rejected):
    """No such device, group or token."""

    status = 404
    code = "not_found"


class Conflict(Rejected):
    """The name is taken, or the state moved on."""

    status = 409
    code = "conflict"


class TooLarge(Rejected):
    """An upload over the configured limit."""

    status = 413
    code = "too_large"


class MessageRejected(Rejected):
    """An MQTT payload that fails validation; it is logged and dropped."""

    code = "message_rejected"


class Transient(FleetError):
    """May succeed later: retry with backoff."""

    status = 503
    code = "unavailable"


class BrokerUnavailable(Transient):
    """The MQTT broker cannot be reached."""

    code = "broker_unavailable"


class DatabaseUnavailable(Transient):
    """The database cannot be reached."""

    code = "database_unavailable"


class ConfigError(Rejected):
    """The controller cannot start as configured: an operator must act."""

    status = 500
    code = "config_error"


class ImageRejected(Rejected):
    """A firmware image, its manifest or its recipe fails a check; never retried as is."""

    status = 422
    code = "image_rejected"


class ImageBuildFailed(Transient):
    """A command of an image build failed: often the mirror or the network; run it again."""

    code = "image_build_failed"


class StorageUnavailable(Transient):
    """The artifact store cannot be written: disk full, permissions, I/O error."""

    code = "storage_unavailable"


class ArtifactCorrupt(Transient):
    """A stored artifact's bytes no longer hash to its address; moved to quarantine.

    Transient for a device: it retries, and the download works again once an admin has
    pushed the model again (the store then has the right bytes at that address).
    """

    code = "artifact_corrupt"


class RateLimited(Transient):
    """Too many failed sign-ins for this name or address; try again after a pause."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str = "", *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # sent as Retry-After
