"""Every error the agent raises, in one tree whose two branches tell the caller what to do.

    AgentError
    ├── Rejected                 the same input fails the same way: never retry it as is
    │   ├── RequestRejected      an API request is wrong (HTTP 4xx)
    │   │   ├── InvalidRequest       400, malformed or out of range
    │   │   ├── ContextOverflow      400, prompt longer than the model's context
    │   │   ├── ModelNotFound        404, no such model is served
    │   │   └── Unauthorized         401, missing or wrong API key
    │   ├── ConfigError          the agent cannot work as configured: an operator must act
    │   │   ├── ModelLoadError       a model file is missing, corrupt or does not fit
    │   │   │   └── MemoryBudgetExceeded  it would not fit the memory budget
    │   │   ├── EnrollmentRejected   the controller refused the enrollment (agent.link.errors)
    │   │   └── IdentityError        the state folder's identity is unusable (agent.link.errors)
    │   ├── SlotRejected         a slot operation that cannot succeed (agent.store.slots)
    │   ├── TufRejected          TUF metadata fails verification (agent.update.tuf_client)
    │   ├── DownloadRejected     the artifact cannot be had as signed (agent.update.download)
    │   └── TargetRejected       a signed target this device cannot install (agent.update.updater)
    └── Transient                may pass later: retry with backoff
        ├── Overloaded           429, queue full; carries retry_after seconds
        ├── RequestTimeout       504, the request ran past its deadline
        ├── ModelNotReady        503, the model is still loading or swapping
        ├── ModelFailed          503, the model failed this call; carries a FailureKind
        ├── Degraded             503, the model and every fallback tier failed; Retry-After
        ├── LinkUnavailable      the controller or broker did not answer (agent.link.errors)
        ├── SlotUnavailable      an OS error under the slots (agent.store.slots)
        ├── TufUnavailable       TUF metadata could not be fetched (agent.update.tuf_client)
        └── DownloadUnavailable  the transfer failed; a retry resumes it (agent.update.download)

Subsystems that want one name for all their errors add a family class under
:class:`AgentError` (``SlotError``, ``TufError``, ``DownloadError``) and derive each
error from its family and one branch, so ``except SlotError`` still catches every slot
error while :func:`retryable` reads the branch. Whoever decides whether to try again
(the updater, the link) asks :func:`retryable` and nothing else.

Third-party exceptions (llama.cpp, ONNX Runtime, httpx, tuf, OS errors) are translated
into these where they are met, so the API layer maps one tree to HTTP.
"""

from __future__ import annotations

from models.policy import FailureKind

__all__ = [
    "AgentError",
    "ConfigError",
    "ContextOverflow",
    "Degraded",
    "InvalidRequest",
    "MemoryBudgetExceeded",
    "ModelFailed",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "Rejected",
    "RequestRejected",
    "RequestTimeout",
    "Transient",
    "Unauthorized",
    "retryable",
]


class AgentError(Exception):
    """Root of the agent's errors; ``status`` and ``code`` map it onto HTTP."""

    status: int = 500
    code: str = "internal_error"
    kind: str = "server_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class Rejected(AgentError):
    """Trying the same again cannot help: the input, the file or the configuration is wrong."""


class Transient(AgentError):
    """The agent could not do this now; the same call may succeed later."""

    status = 503
    code = "unavailable"


def retryable(exc: BaseException) -> bool:
    """Whether trying again later may succeed: only :class:`Transient` errors say so."""
    return isinstance(exc, Transient)


class RequestRejected(Rejected):
    """The request is wrong; sending it again cannot help."""

    status = 400
    code = "invalid_request"
    kind = "invalid_request_error"


class InvalidRequest(RequestRejected):
    """Malformed or out-of-range input."""


class ContextOverflow(RequestRejected):
    """The prompt (plus requested output) does not fit the model's context window."""

    code = "context_length_exceeded"


class ModelNotFound(RequestRejected):
    """The request names a model this agent does not serve."""

    status = 404
    code = "model_not_found"


class Unauthorized(RequestRejected):
    """Missing or wrong API key."""

    status = 401
    code = "invalid_api_key"
    kind = "authentication_error"


class Overloaded(Transient):
    """The waiting queue is full; the client should come back after ``retry_after`` seconds."""

    status = 429
    code = "rate_limit_exceeded"
    kind = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(Transient):
    """The request ran past its deadline and was cancelled."""

    status = 504
    code = "timeout"


class ModelNotReady(Transient):
    """The model is loading or being swapped, or (``failure`` set) it failed to load."""

    code = "model_not_ready"

    def __init__(self, message: str, *, failure: FailureKind | None = None) -> None:
        super().__init__(message)
        self.failure = failure


class ModelFailed(Transient):
    """The runtime failed this call (error, out of memory, GPU fault); its breaker counts it."""

    code = "model_failed"

    def __init__(self, message: str, *, failure: FailureKind = FailureKind.ERROR) -> None:
        super().__init__(message)
        self.failure = failure


class Degraded(Transient):
    """Neither the model nor any tier of its fallback chain could answer; come back later."""

    code = "degraded_unavailable"

    def __init__(self, message: str, *, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(Rejected):
    """The operator's configuration cannot work; fix it and restart."""


class ModelLoadError(ConfigError):
    """A model file is missing, corrupt or does not fit."""


class MemoryBudgetExceeded(ModelLoadError):
    """Loading the model would take the served models past the memory budget."""
