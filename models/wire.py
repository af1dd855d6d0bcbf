"""Every message the agent and the controller exchange, as pydantic models.

MQTT payloads are UTF-8 JSON of one of the ``*Message`` models below, each with a
``schema_version``. Unknown fields are ignored so a newer peer can add optional
fields without breaking an older one; a change that old peers cannot ignore bumps
:data:`SCHEMA_VERSION`, and a receiver rejects versions it does not know. The
enrollment request and response travel over HTTPS, not MQTT, but live here too
because both sides build them.

Payload sizes are bounded (:data:`MAX_PAYLOAD_BYTES`) and every list has a length
cap, so a hostile or broken peer cannot make the other side allocate without end.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError

from models.device import DeviceReport
from models.policy import FailureKind, PolicyRef
from models.topics import Channel, DeviceId
from models.values import ModelName, Sha256, Version

__all__ = [
    "CHANNEL_MESSAGES",
    "DESIRED_LIFETIME",
    "MAX_PAYLOAD_BYTES",
    "MAX_SAMPLES_PER_BATCH",
    "SCHEMA_VERSION",
    "BreakerState",
    "BrokerCredentials",
    "Command",
    "CommandKind",
    "DegradedModel",
    "DesiredModel",
    "DesiredState",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "Event",
    "EventKind",
    "MessageId",
    "ModelState",
    "ProvisionCheckRequest",
    "ProvisionCheckResponse",
    "ReportedModel",
    "ReportedState",
    "Severity",
    "TargetRef",
    "TelemetryBatch",
    "TelemetrySample",
    "WireError",
    "WireModel",
    "b64",
    "decode",
    "encode",
    "enrollment_proof",
    "runs_wanted",
    "utc_now",
]

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024  # bytes; larger MQTT payloads are rejected unread
MAX_SAMPLES_PER_BATCH = 500

MessageId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""A sender-chosen unique id (a UUID's hex); receivers store each id once."""

ShortText = Annotated[str, Field(max_length=2000)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class WireError(ValueError):
    """A payload that is not a valid message of the expected kind; never retry it."""


class WireModel(BaseModel):
    """Base of every message: frozen, unknown fields ignored, a schema version inside."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1  # SCHEMA_VERSION


# --- desired and reported state -------------------------------------------------------


class TargetRef(WireModel):
    """A TUF target the device must install: path in the targets metadata, length and hash.

    The agent downloads it only if freshly verified TUF targets metadata lists the same
    path with the same length and sha256 (:func:`models.director.check_targets`).
    """

    path: str = Field(min_length=1, max_length=512)  # e.g. "gemma3-270m/1.1/Q4_K_M.gguf"
    length: int = Field(ge=1)  # bytes
    sha256: Sha256


class DesiredModel(WireModel):
    """A model the device should serve.

    With a ``target`` the device installs that signed artifact (an update, or a rollback
    to an older one) and serves it; without one it serves what its store holds, at
    ``version`` if given.
    """

    name: ModelName
    version: Version | None = None
    target: TargetRef | None = None


DESIRED_LIFETIME = timedelta(days=30)  # a desired state expires this long after it is issued


def _desired_expiry() -> datetime:
    return utc_now() + DESIRED_LIFETIME


class DesiredState(WireModel):
    """What the controller wants one device to run. Published retained on ``desired``.

    On the wire it is the payload of a DSSE envelope signed by the controller's director
    key (:mod:`models.director`). ``version`` grows by one with every change and the agent
    keeps the last one it accepted, so a replayed or reordered older state is refused;
    ``expires`` stops a captured state being held back and delivered much later.
    ``fallback`` is a :class:`models.policy.FallbackPolicy` as JSON (empty: none). It is
    kept loose here so that an agent can refuse a malformed policy on its own, with an
    event, while still acting on the rest of a state it verified. ``config`` is for
    agent settings overrides (a later issue); agents ignore keys they do not know.
    """

    device_id: DeviceId
    version: int = Field(ge=1)
    issued_at: AwareDatetime = Field(default_factory=utc_now)
    expires: AwareDatetime = Field(default_factory=_desired_expiry)
    models: list[DesiredModel] = Field(default_factory=list, max_length=64)
    config: dict[str, JsonValue] = Field(default_factory=dict)
    fallback: dict[str, JsonValue] = Field(default_factory=dict)


class ModelState(StrEnum):
    """Where one model stands on the device."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    MISSING = "missing"  # desired, but not in the device's model store


class ReportedModel(WireModel):
    """One model as the device actually serves it (or failed to)."""

    name: ModelName
    version: str | None = Field(default=None, max_length=64)
    sha256: Sha256 | None = None  # of the file served: compared with a desired target
    state: ModelState
    runtime: str | None = Field(default=None, max_length=64)  # "llama.cpp", "onnxruntime"
    device: str | None = Field(default=None, max_length=64)  # "cpu", "cuda:0"
    memory_bytes: int | None = Field(default=None, ge=0)
    error: ShortText | None = None


class BreakerState(StrEnum):
    """A served model's circuit breaker (degraded mode)."""

    CLOSED = "closed"  # the model answers
    OPEN = "open"  # requests go to the fallback chain until wait_in_open ends
    HALF_OPEN = "half_open"  # a few probe requests decide between closed and open


class DegradedModel(WireModel):
    """A served model whose breaker is not closed: requests are answered by its fallbacks."""

    name: ModelName
    breaker: BreakerState
    kind: FailureKind  # what opened it
    reason: ShortText
    since: AwareDatetime


class ReportedState(WireModel):
    """What the device actually runs. Published retained on ``reported`` after each change.

    ``desired_version`` is the last desired state the agent acted on (None: it has
    never received one, and runs its local configuration). ``policy`` is the fallback
    policy it enforces, ``degraded`` the models answered by their fallbacks right now.
    """

    device_id: DeviceId
    desired_version: int | None = Field(default=None, ge=1)
    converged: bool  # every desired model is ready
    models: list[ReportedModel] = Field(default_factory=list, max_length=64)
    agent_version: str = Field(max_length=64)
    device: DeviceReport | None = None
    policy: PolicyRef | None = None
    degraded: list[DegradedModel] = Field(default_factory=list, max_length=64)
    reported_at: AwareDatetime = Field(default_factory=utc_now)


def runs_wanted(wanted: DesiredModel, got: ReportedModel) -> bool:
    """The reported model is the desired one: its signed target's bytes, else its version.

    A target is compared by sha256, so the same file registered under another version
    label (a bundled model pushed to the registry) counts as the one desired.
    """
    if wanted.target is not None and got.sha256 is not None:
        return got.sha256 == wanted.target.sha256
    return wanted.version is None or got.version == wanted.version


# --- telemetry and events ---------------------------------------------------------------


class TelemetrySample(WireModel):
    """One window of device metrics; ``None`` means not measured in this window."""

    id: MessageId
    seq: int = Field(ge=0)  # per device, increasing; gaps show samples dropped from the spool
    ts: AwareDatetime  # end of the window
    window_s: float = Field(gt=0, le=86_400)  # seconds
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)  # 5xx and timeouts
    rejections: int = Field(ge=0)  # 429s: queue full
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p95_ms: float | None = Field(default=None, ge=0)
    ttft_p50_ms: float | None = Field(default=None, ge=0)  # time to first token
    tokens_per_s: float | None = Field(default=None, ge=0)  # generated tokens over the window
    queue_depth: int = Field(default=0, ge=0)  # at the end of the window
    model_memory_bytes: int = Field(default=0, ge=0)
    process_memory_bytes: int | None = Field(default=None, ge=0)
    gpu_utilization_percent: float | None = Field(default=None, ge=0, le=100)
    gpu_memory_used_bytes: int | None = Field(default=None, ge=0)
    gpu_temperature_c: float | None = None
    gpu_power_w: float | None = Field(default=None, ge=0)
    fallbacks: int | None = Field(default=None, ge=0)  # requests a fallback tier answered
    fallbacks_by_tier: dict[str, int] = Field(default_factory=dict, max_length=32)  # "cache": 3


class TelemetryBatch(WireModel):
    """Samples sent together on ``telemetry``; ``dropped`` counts samples the spool lost."""

    device_id: DeviceId
    id: MessageId
    sent_at: AwareDatetime = Field(default_factory=utc_now)
    samples: list[TelemetrySample] = Field(min_length=1, max_length=MAX_SAMPLES_PER_BATCH)
    dropped: int = Field(default=0, ge=0)


class EventKind(StrEnum):
    """What an event reports."""

    ONLINE = "online"
    OFFLINE = "offline"  # the MQTT last will, or a clean shutdown
    MODEL_READY = "model_ready"
    MODEL_FAILED = "model_failed"
    RECONCILE_FAILED = "reconcile_failed"
    SPOOL_DROPPED = "spool_dropped"
    DESIRED_REJECTED = "desired_rejected"  # a desired state failed a trust check
    UPDATE_PROGRESS = "update_progress"  # data: model, version, bytes, total
    UPDATE_VERIFIED = "update_verified"  # downloaded, length and sha256 match TUF
    UPDATE_INSTALLED = "update_installed"  # in its A/B slot and activated
    UPDATE_HEALTHY = "update_healthy"  # health check passed: the new version serves
    UPDATE_FAILED = "update_failed"  # data: phase, reason; nothing changed
    UPDATE_ROLLED_BACK = "update_rolled_back"  # health check failed: previous version serves
    BREAKER_OPENED = "breaker_opened"  # data: model, kind, reason; its fallbacks answer
    BREAKER_HALF_OPEN = "breaker_half_open"  # data: model; probe requests go to it
    BREAKER_CLOSED = "breaker_closed"  # data: model; it answers again
    POLICY_APPLIED = "policy_applied"  # data: name, version, digest
    POLICY_REJECTED = "policy_rejected"  # data: reason; the last good policy stays


class Severity(StrEnum):
    """How much an operator should care."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(WireModel):
    """Something that happened on a device, sent on ``events`` and stored once by id."""

    device_id: DeviceId
    id: MessageId
    ts: AwareDatetime = Field(default_factory=utc_now)
    kind: EventKind
    severity: Severity = Severity.INFO
    message: ShortText = ""
    data: dict[str, JsonValue] = Field(default_factory=dict)


class CommandKind(StrEnum):
    """What a command asks the agent to do."""

    REPORT = "report"  # publish the reported state again
    RECONCILE = "reconcile"  # re-apply the desired state now
    FLUSH = "flush"  # send a telemetry sample now, without waiting for the interval


class Command(WireModel):
    """A one-off request on ``cmd``."""

    device_id: DeviceId
    id: MessageId
    kind: CommandKind
    issued_at: AwareDatetime = Field(default_factory=utc_now)


# --- enrollment (HTTPS) -------------------------------------------------------------------


class EnrollmentRequest(WireModel):
    """First contact: an enrollment token, the device's public key and what it offers.

    ``signature`` is the device key's Ed25519 signature over :func:`enrollment_proof`,
    proving the caller holds the private key; ``timestamp`` bounds how long a captured
    request could be replayed.
    """

    token: str = Field(min_length=1, max_length=256)
    public_key: str = Field(min_length=40, max_length=64)  # base64 of the raw 32-byte key
    timestamp: AwareDatetime
    signature: str = Field(min_length=80, max_length=100)  # base64 of a 64-byte signature
    name: str = Field(min_length=1, max_length=128)  # a human name; the hostname by default
    agent_version: str = Field(max_length=64)
    device: DeviceReport
    hardware_id: str | None = Field(default=None, min_length=8, max_length=128)
    """What survives a re-flash (DMI product UUID, Jetson serial number): a re-flashed
    device enrolls as the device it was, with a new key, instead of as a duplicate."""


def enrollment_proof(token: str, public_key: str, timestamp: datetime) -> bytes:
    """The bytes a device signs to enroll: domain-separated, so no other signature fits."""
    stamp = timestamp.astimezone(UTC).isoformat()
    return f"edgefleet-enroll-v1\n{token}\n{public_key}\n{stamp}".encode()


class BrokerCredentials(WireModel):
    """How a device reaches the broker; ``ca_pem`` is set when the broker speaks TLS."""

    url: str  # mqtt://host:port or mqtts://host:port
    username: str
    password: str
    client_id: str
    ca_pem: str | None = None


class EnrollmentResponse(WireModel):
    """The controller's answer to a successful enrollment; the password is shown once."""

    device_id: DeviceId
    broker: BrokerCredentials
    telemetry_interval_s: float = Field(default=10.0, gt=0)  # seconds between samples
    heartbeat_interval_s: float = Field(default=30.0, gt=0)  # offline after 3 missed
    tuf_root: str | None = Field(default=None, max_length=MAX_PAYLOAD_BYTES)
    """The fleet's TUF root.json, trusted on first use by a device not provisioned with one."""


class ProvisionCheckRequest(WireModel):
    """Provisioning asks whether a token would enroll, without spending a use of it."""

    token: str = Field(min_length=1, max_length=256)


class ProvisionCheckResponse(WireModel):
    """What provisioning stamps into an image besides the token: the fleet's trust anchors."""

    token_id: str
    group: str | None = None
    uses_left: int = Field(ge=1)
    expires_at: AwareDatetime | None = None
    tuf_root: str = Field(max_length=MAX_PAYLOAD_BYTES)  # the fleet's current TUF root.json
    broker_url: str  # mqtt://host:port or mqtts://host:port, as devices will see it
    broker_ca_pem: str | None = None  # set when the broker speaks TLS


# --- encoding ------------------------------------------------------------------------------

M = TypeVar("M", bound=WireModel)

CHANNEL_MESSAGES: dict[Channel, type[WireModel]] = {
    Channel.DESIRED: DesiredState,
    Channel.REPORTED: ReportedState,
    Channel.TELEMETRY: TelemetryBatch,
    Channel.EVENTS: Event,
    Channel.CMD: Command,
}


def encode(message: WireModel) -> bytes:
    """The MQTT payload for ``message``."""
    return message.model_dump_json(exclude_none=True).encode()


def decode(kind: type[M], payload: bytes) -> M:
    """Parse and validate ``payload`` as ``kind``, or raise :class:`WireError` saying why."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        return kind.model_validate_json(payload)
    except ValidationError as exc:
        first: Any = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise WireError(f"invalid {kind.__name__}: {where}: {first['msg']}") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
