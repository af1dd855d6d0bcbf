"""Every error the agent raises, in one tree.

    AgentError
    ├── RequestRejected          the request can never succeed as sent: do not retry
    │   ├── InvalidRequest       400, malformed or out of range
    │   ├── ContextOverflow      400, prompt longer than the model's context
    │   ├── ModelNotFound        404, no such model is served
    │   └── Unauthorized         401, missing or wrong API key
    ├── Transient                may succeed later: retry with backoff
    │   ├── Overloaded           429, queue full; carries retry_after seconds
    │   ├── RequestTimeout       504, the request ran past its deadline
    │   └── ModelNotReady        503, the model is still loading or swapping
    └── ConfigError              the agent cannot start as configured (operator error)
        └── ModelLoadError       a model file could not be loaded

Third-party exceptions (llama.cpp, ONNX Runtime, OS errors) are translated into
these at the runtime boundary, so the API layer maps one tree to HTTP and nothing else.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "ContextOverflow",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "RequestRejected",
    "RequestTimeout",
    "Transient",
    "Unauthorized",
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


class RequestRejected(AgentError):
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


class Transient(AgentError):
    """The agent could not serve this now; the same request may succeed later."""

    status = 503
    code = "unavailable"
    kind = "server_error"


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
    """The model is loading or being swapped."""

    status = 503
    code = "model_not_ready"


class ConfigError(AgentError):
    """The operator's configuration cannot work; fix it and restart."""


class ModelLoadError(ConfigError):
    """A model file is missing, corrupt or does not fit."""
