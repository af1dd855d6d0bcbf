"""The controller's tables. Every change to them ships with an Alembic migration.

All state lives here (plus the broker and the artifact store), so any number of
controller replicas can share one PostgreSQL database. Timestamps are stored as
timezone-aware UTC; SQLite hands them back naive, so :func:`as_utc` repairs them
on the way out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

__all__ = [
    "Alert",
    "AlertDelivery",
    "AlertRule",
    "AlertWebhook",
    "ApiToken",
    "AuditEntry",
    "Device",
    "DeviceTag",
    "EnrollmentToken",
    "EventRow",
    "GateCheckRow",
    "Group",
    "Lease",
    "LoginAttempt",
    "ModelArtifact",
    "PolicyAssignment",
    "PolicyRow",
    "Rollout",
    "RolloutDevice",
    "TelemetryRow",
    "User",
    "WebSession",
    "as_utc",
    "utc_now",
]


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """A stored timestamp as aware UTC, whichever database it came from."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class Group(SQLModel, table=True):
    """A named set of devices; the unit staged rollouts target."""

    __tablename__ = "groups"

    name: str = Field(primary_key=True, max_length=64)
    description: str = Field(default="", max_length=500)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class Device(SQLModel, table=True):
    """One enrolled device: identity, credentials, last known state."""

    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=63)
    name: str = Field(max_length=128)
    group: str | None = Field(default=None, foreign_key="groups.name", index=True, max_length=64)
    public_key: str = Field(unique=True, max_length=64)  # base64 raw Ed25519 key
    # What survives a re-flash (DMI product UUID, Jetson serial): a board that comes back
    # with a new key stays this device. Unique, NULLs apart: older agents send none.
    hardware_id: str | None = Field(default=None, unique=True, index=True, max_length=128)
    token_id: str | None = Field(default=None, max_length=32)  # the token it enrolled with
    mqtt_password_hash: str = Field(max_length=256)  # Mosquitto's $7$ PBKDF2-SHA512 form
    # The same password in bcrypt, for nats-server. NULL for devices enrolled before
    # there was one: they re-enroll to log in to NATS (docs/broker.md).
    mqtt_password_bcrypt: str | None = Field(default=None, max_length=60)
    agent_version: str = Field(default="", max_length=64)
    device_report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    enrolled_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    online: bool = Field(default=False, index=True)
    last_seen: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    desired_version: int = Field(default=0)  # 0: no desired state published yet
    desired: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # DesiredState
    reported: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # ReportedState
    reported_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    telemetry_dropped: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class DeviceTag(SQLModel, table=True):
    """A free-form label on a device, for filtering and rollout targeting."""

    __tablename__ = "device_tags"

    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=63)
    tag: str = Field(primary_key=True, index=True, max_length=64)


class EnrollmentToken(SQLModel, table=True):
    """A token a device presents once (or ``uses_total`` times) to enroll.

    Only a SHA-256 of the secret is stored; the secret is printed once at creation.
    """

    __tablename__ = "enrollment_tokens"

    id: str = Field(primary_key=True, max_length=32)  # public handle, shown in listings
    secret_sha256: str = Field(unique=True, max_length=64)
    group: str | None = Field(default=None, foreign_key="groups.name", max_length=64)
    uses_total: int = Field(default=1, ge=1)
    uses_left: int = Field(default=1, ge=0)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    note: str = Field(default="", max_length=200)


class TelemetryRow(SQLModel, table=True):
    """One telemetry sample; ``(device_id, sample_id)`` is unique so replays store once."""

    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "sample_id", name="uq_telemetry_device_sample"),
        Index("ix_telemetry_device_ts", "device_id", "ts"),
    )

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    device_id: str = Field(max_length=63)
    sample_id: str = Field(max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    window_s: float
    requests: int
    errors: int
    rejections: int
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None
    tokens_per_s: float | None = None
    queue_depth: int = 0
    model_memory_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    process_memory_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    gpu_utilization_percent: float | None = None
    gpu_memory_used_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    gpu_temperature_c: float | None = None
    gpu_power_w: float | None = None
    fallbacks: int | None = Field(default=None, sa_column=Column(BigInteger))  # None: not sent
    fallbacks_by_tier: dict[str, int] | None = Field(default=None, sa_column=Column(JSON))
    sent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    stored_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class EventRow(SQLModel, table=True):
    """One device event; ``(device_id, event_id)`` is unique so replays store once."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("device_id", "event_id", name="uq_events_device_event"),
        Index("ix_events_device_ts", "device_id", "ts"),
    )

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    device_id: str = Field(max_length=63)
    event_id: str = Field(max_length=64)
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    kind: str = Field(max_length=32)
    severity: str = Field(max_length=16)
    message: str = Field(default="", max_length=2000)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    stored_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ModelArtifact(SQLModel, table=True):
    """One uploaded model file: a (name, version, variant) naming one content-addressed blob.

    The bytes live in the artifact store under their SHA-256; several rows may share
    one blob. A yanked artifact stays downloadable (a rollback may need it) but is no
    longer offered as the latest version.
    """

    __tablename__ = "model_artifacts"
    __table_args__ = (
        UniqueConstraint(
            "name", "version", "variant", name="uq_model_artifacts_name_version_variant"
        ),
    )

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    name: str = Field(max_length=64)
    version: str = Field(max_length=64)
    variant: str = Field(max_length=64)  # "Q4_K_M", "int8"; "default" when there is one
    format: str = Field(max_length=8)  # models.manifest.ModelFormat
    sha256: str = Field(index=True, max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON, nullable=False)
    )  # fleet.api.schemas.ModelMetadata
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    yanked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    yank_reason: str = Field(default="", sa_column=Column(String(500), nullable=False))


def _stamp(nullable: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(DateTime(timezone=True), nullable=nullable),
    )


class Rollout(SQLModel, table=True):
    """A staged rollout: its spec as asked, and where it stands (``fleet.rollout.plan``).

    ``revision`` grows with every write; the engine and admin actions update the row
    only at the revision they read, so two controllers can never both advance a stage.
    """

    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(default="", max_length=128)
    change_key: str = Field(index=True, max_length=96)  # "model:<name>"
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # RolloutSpec
    status: str = Field(index=True, max_length=16)  # plan.RolloutStatus
    stage: int = Field(default=0)
    phase: str = Field(max_length=24)  # plan.Phase
    stage_started_at: datetime = _stamp()
    soak_started_at: datetime | None = _stamp(nullable=True)
    next_check_at: datetime | None = _stamp(nullable=True)  # when the gates are checked next
    gate_failures: list[int] = Field(default_factory=list, sa_column=Column(JSON))  # consecutive
    revision: int = Field(default=1)
    reason: str = Field(default="", sa_column=Column(String(2000), nullable=False))
    created_by: str = Field(max_length=64)
    created_at: datetime = _stamp()
    updated_at: datetime = _stamp()
    finished_at: datetime | None = _stamp(nullable=True)


class RolloutDevice(SQLModel, table=True):
    """One device in a rollout: its stage, its variant, what it had before, where it stands."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_rollout_state", "rollout_id", "state"),)

    rollout_id: str = Field(foreign_key="rollouts.id", primary_key=True, max_length=32)
    device_id: str = Field(foreign_key="devices.id", primary_key=True, index=True, max_length=63)
    rank: str = Field(max_length=16)  # plan.device_rank: the release order
    stage: int | None = None  # the stage that released it
    state: str = Field(max_length=16)  # plan.DeviceState
    variant: str | None = Field(default=None, max_length=64)
    placement: str | None = Field(default=None, max_length=8)  # "gpu" or "cpu"
    target: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # DesiredModel
    previous: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # Change.capture
    failure: str | None = Field(default=None, max_length=24)  # spec.FailureKind
    detail: str = Field(default="", sa_column=Column(String(2000), nullable=False))
    desired_version: int | None = None  # the desired state that carried the change
    since: datetime = _stamp()  # entered its state
    issued_at: datetime | None = _stamp(nullable=True)  # the change reached its desired state


class GateCheckRow(SQLModel, table=True):
    """One gate check with its evidence: the numbers, thresholds and sample counts."""

    __tablename__ = "rollout_gate_checks"
    __table_args__ = (Index("ix_rollout_gate_checks_rollout_at", "rollout_id", "at"),)

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    rollout_id: str = Field(foreign_key="rollouts.id", max_length=32)
    stage: int
    gate: int  # its index in the spec's gates
    at: datetime = _stamp()
    verdict: str = Field(max_length=16)  # pass, fail, insufficient
    decision: str = Field(max_length=24)  # what the engine made of it: pass, wait, fail, abort
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    evidence: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class AuditEntry(SQLModel, table=True):
    """Who or what did what, when and why: every admin action and automatic decision."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_subject_at", "subject", "at"),)

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    at: datetime = _stamp()
    actor: str = Field(max_length=64)  # a user's name, "admin", or "controller" (the engine)
    action: str = Field(max_length=48)  # "rollout.create", "rollout.stage_advanced", ...
    subject: str = Field(max_length=96)  # "rollout:<id>"
    reason: str = Field(default="", sa_column=Column(String(2000), nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    source: str = Field(default="", max_length=128)  # "<client address> (<how>)"; "" automatic


class PolicyRow(SQLModel, table=True):
    """One version of a degraded-mode fallback policy (``models.policy.FallbackPolicy``)."""

    __tablename__ = "fallback_policies"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_fallback_policies_version"),)

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    name: str = Field(index=True, max_length=64)
    version: int
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # FallbackPolicy
    digest: str = Field(max_length=64)  # models.policy.policy_digest
    description: str = Field(default="", sa_column=Column(String(2000), nullable=False))
    created_by: str = Field(max_length=64)
    created_at: datetime = _stamp()


class PolicyAssignment(SQLModel, table=True):
    """Which policy a group or a device gets; a device's own assignment wins over its group's."""

    __tablename__ = "policy_assignments"

    scope: str = Field(primary_key=True, max_length=8)  # "group" or "device"
    target: str = Field(primary_key=True, max_length=128)  # the group name or device id
    policy: str = Field(index=True, max_length=64)
    version: int
    assigned_by: str = Field(max_length=64)
    assigned_at: datetime = _stamp()


class Alert(SQLModel, table=True):
    """A condition or event an admin should see, open until it clears (``cleared_at``).

    A condition (a device offline) clears when it no longer holds; an event (a rollout
    aborted) when an admin acknowledges it. ``fleet.alerts`` raises and clears them.
    """

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_open", "kind", "subject", "cleared_at"),)

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    kind: str = Field(max_length=32)  # fleet.alerts.RuleKind: "group_degraded", ...
    subject: str = Field(max_length=160)  # "group:<name>", "device:<id>", "rollout:<id>"
    severity: str = Field(max_length=16)  # models.wire.Severity
    message: str = Field(sa_column=Column(String(2000), nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    raised_at: datetime = _stamp()
    updated_at: datetime = _stamp()
    cleared_at: datetime | None = _stamp(nullable=True)
    acknowledged_at: datetime | None = _stamp(nullable=True)
    acknowledged_by: str | None = Field(default=None, max_length=64)


class User(SQLModel, table=True):
    """A person who uses the dashboard, the API or the CLI, with one role."""

    __tablename__ = "users"

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    name: str = Field(unique=True, max_length=64)
    role: str = Field(max_length=16)  # fleet.auth.roles.Role
    password_hash: str = Field(max_length=256)  # argon2id, PHC string
    disabled: bool = False
    created_by: str = Field(max_length=64)
    created_at: datetime = _stamp()
    password_changed_at: datetime = _stamp()


class ApiToken(SQLModel, table=True):
    """A user's token for the API and the CLI; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=64)  # what it is for: "laptop", "ci"
    secret_sha256: str = Field(unique=True, max_length=64)
    created_at: datetime = _stamp()
    expires_at: datetime | None = _stamp(nullable=True)
    last_used_at: datetime | None = _stamp(nullable=True)
    revoked_at: datetime | None = _stamp(nullable=True)


class WebSession(SQLModel, table=True):
    """A signed-in browser; the cookie holds the secret, this row only its SHA-256."""

    __tablename__ = "web_sessions"

    id: str = Field(primary_key=True, max_length=64)  # SHA-256 of the cookie's secret
    user_id: int = Field(foreign_key="users.id", index=True)
    csrf_token: str = Field(max_length=64)  # every form and htmx request sends it back
    source: str = Field(default="", max_length=64)  # client address at sign-in
    created_at: datetime = _stamp()
    last_seen_at: datetime = _stamp()
    expires_at: datetime = _stamp()
    revoked_at: datetime | None = _stamp(nullable=True)


class LoginAttempt(SQLModel, table=True):
    """One sign-in try; recent failures per name and per address rate-limit the next."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_name_at", "name", "at"),
        Index("ix_login_attempts_source_at", "source", "at"),
    )

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    at: datetime = _stamp()
    name: str = Field(max_length=64)
    source: str = Field(max_length=64)
    ok: bool


class AlertRule(SQLModel, table=True):
    """An admin's settings of one alert rule; a kind without a row runs on its defaults."""

    __tablename__ = "alert_rules"

    kind: str = Field(primary_key=True, max_length=32)  # fleet.alerts.RuleKind
    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_by: str = Field(max_length=64)
    updated_at: datetime = _stamp()


class AlertWebhook(SQLModel, table=True):
    """Where alert changes are POSTed; at most one row (``id`` 1), none: no webhook."""

    __tablename__ = "alert_webhook"

    id: int = Field(default=1, primary_key=True)
    url: str = Field(sa_column=Column(String(2000), nullable=False))
    secret: str | None = Field(default=None, max_length=256)  # HMAC key; never shown again
    updated_by: str = Field(max_length=64)
    updated_at: datetime = _stamp()


class AlertDelivery(SQLModel, table=True):
    """One webhook POST not yet delivered: the outbox, written with the alert's change.

    Delivered rows are deleted, so the table holds only what is still owed.
    """

    __tablename__ = "alert_deliveries"

    id: int | None = Field(default=None, sa_column=Column(RowId, primary_key=True))
    alert_id: int = Field(foreign_key="alerts.id")
    event: str = Field(max_length=16)  # raised, cleared, acknowledged
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _stamp()
    attempts: int = 0
    next_attempt_at: datetime = _stamp()  # not before; while a POST runs, its lease's end
    last_error: str = Field(default="", sa_column=Column(String(500), nullable=False))


class Lease(SQLModel, table=True):
    """Who runs a fleet-wide job (``fleet.leases``); times are the database's own clock.

    Seconds since the epoch as the database reads its clock, so replicas whose clocks
    disagree still agree on when a lease ran out.
    """

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=128)  # host/pid/random: a restarted process is another
    epoch: int = Field(sa_column=Column(BigInteger, nullable=False))  # grows at each takeover
    acquired_at: float = Field(sa_column=Column(Double, nullable=False))
    expires_at: float = Field(sa_column=Column(Double, nullable=False))
