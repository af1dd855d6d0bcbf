"""Controller settings: flags and ``EDGEFLEET_FLEET_*`` environment variables.

This is the process edge: the app, the link and the broker below it take this
frozen object and never read the environment themselves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ADMIN_TOKEN_FILE", "DEFAULT_DATA_DIR", "FleetSettings"]

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "edgefleet" / "fleet"
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105  (a file name in the data folder)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")  # S3's rules; "_" for old Ceph


class FleetSettings(BaseSettings):
    """Everything an operator can set on the controller; see docs/operators.md."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", frozen=True, extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR  # SQLite file, admin token, broker auth files
    database_url: str | None = None  # None: sqlite:///<data_dir>/fleet.db
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = None  # how devices reach this API; None: http://host:port
    admin_token: SecretStr | None = None  # None: generated once into <data_dir>/admin-token
    body_timeout_s: float = Field(default=30.0, gt=0)  # longest pause in a request body (408)

    # Dashboard sessions (docs/dashboard.md). cookie_secure None: Secure when served over
    # https; set true behind a proxy that terminates TLS.
    cookie_secure: bool | None = None
    session_idle_minutes: float = Field(default=480.0, gt=0)  # signed out after this idle
    session_lifetime_hours: float = Field(default=168.0, gt=0)  # and after this in any case

    # Model registry.
    artifact_dir: Path | None = None  # content-addressed model files; None: <data_dir>/artifacts
    artifact_max_bytes: int = Field(default=64 * 2**30, ge=1)  # the largest upload accepted
    # Where model files are kept (docs/fleet.md, "Artifact storage"): "file" in
    # artifact_dir, which replicas share on one volume; "s3" in a bucket (artifact_dir
    # then only stages uploads). S3 credentials come from the AWS chain (AWS_* variables,
    # ~/.aws, a role), never from these settings.
    artifact_backend: Literal["file", "s3"] = "file"
    artifact_s3_bucket: str | None = None  # needed with artifact_backend "s3"
    artifact_s3_prefix: str = ""  # keys <prefix>/<sha[:2]>/<sha>; "/" at either end dropped
    artifact_s3_endpoint_url: str | None = None  # MinIO, Ceph, R2: http(s)://host:port; None: AWS
    artifact_s3_region: str | None = None  # None: the AWS chain's (AWS_REGION, ~/.aws/config)

    # TUF (docs/updates.md, "Trust"). Replicas must share these folders, like artifact_dir.
    tuf_dir: Path | None = None  # TUF metadata and staged files; None: <data_dir>/tuf
    key_dir: Path | None = None  # online private keys; None: <data_dir>/keys
    tuf_refresh_interval_s: float = Field(default=3600.0, gt=0)  # seconds between renewals
    tuf_root_expiry_days: float = Field(default=365.0, gt=0)  # days each root version lasts
    tuf_targets_expiry_days: float = Field(default=90.0, gt=0)
    tuf_snapshot_expiry_days: float = Field(default=7.0, gt=0)
    tuf_timestamp_expiry_days: float = Field(default=1.0, gt=0)  # keep >> refresh interval

    # MQTT. broker_url None starts the embedded broker (amqtt, MQTT 3.1.1) in-process.
    broker_url: str | None = None  # mqtt://host:port or mqtts://host:port
    broker_public_url: str | None = None  # what devices are told; None: broker_url
    embedded_broker_host: str = "127.0.0.1"
    embedded_broker_port: int = Field(default=1883, ge=0, le=65535)
    broker_auth_dir: Path | None = None  # where the broker's users go; None: <data_dir>/broker
    # The users' form: "mosquitto" (password_file + acl_file, also the embedded broker's)
    # or "nats" (an authorization block each nats-server includes: docs/broker.md).
    broker_auth_format: Literal["mosquitto", "nats"] = "mosquitto"
    # SIGHUP this pid after rewriting the users; a pattern (/run/nats/*.pid) for a cluster.
    broker_pid_file: Path | None = None
    # "nats" only: the operator's own NATS logins, a JSON list of nats-server user maps,
    # written beside the controller's and the devices'.
    nats_extra_users_file: Path | None = None
    broker_ca_file: Path | None = None  # the broker's CA, handed to devices for mqtts://
    broker_username: str = "edgefleet-controller"  # the controller's own broker account
    broker_password: SecretStr | None = None  # None: generated into <data_dir>/broker-password
    manage_broker_auth: bool = True  # write password_file + acl_file for the broker
    client_id: str = "edgefleet-controller"
    shared_subscription_group: str | None = None  # MQTT 5 only: spread ingest over replicas
    # NATS's MQTT gateway has no MQTT 5: replicas share ingest through JetStream instead,
    # pulling from nats://host:4222[,nats://host2:4222] (docs/scale.md).
    nats_ingest_url: str | None = None
    # A message a replica took and did not acknowledge goes to another after this long.
    nats_ingest_ack_wait_s: float = Field(default=30.0, ge=1, le=3600)

    # Telemetry.
    telemetry_interval_s: float = Field(default=10.0, gt=0)  # told to devices at enrollment
    heartbeat_interval_s: float = Field(default=30.0, gt=0)  # offline after 3 missed
    rollout_interval_s: float = Field(default=2.0, gt=0, le=300)  # between rollout steps
    # Seconds the leader lease lasts: a dead leader's jobs move to another replica
    # within 4/3 of it (fleet/leases.py).
    leader_lease_s: float = Field(default=10.0, ge=0.3, le=300)
    retention_days: float = Field(default=30.0, gt=0)  # older samples and events are pruned
    ingest_batch_rows: int = Field(default=500, ge=1)  # rows per database write
    ingest_flush_ms: int = Field(default=200, ge=1)  # at most this long before a write

    # Degraded mode (docs/degraded-mode.md, "On the controller"): a group_degraded alert
    # opens while at least this share of a group's devices that count (not revoked;
    # online or seen within degraded_alert_seen_within_s) report degraded models, and
    # at least degraded_alert_min_devices of them do.
    degraded_alert_share: float = Field(default=0.2, gt=0, le=1)  # 0.2: a fifth of the group
    degraded_alert_min_devices: int = Field(default=2, ge=1)
    degraded_alert_interval_s: float = Field(default=10.0, gt=0, le=3600)  # between checks
    degraded_alert_seen_within_s: float = Field(default=300.0, gt=0)  # an offline device counts
    # Alerts (docs/alerts.md): every rule is evaluated every degraded_alert_interval_s; the
    # degraded_alert_* values above are group_degraded's defaults, an admin's rule wins.
    # Webhook deliveries wait in an outbox, checked every alert_webhook_interval_s; a
    # failed POST is retried after a backoff doubling from initial to max, jittered.
    alert_webhook_interval_s: float = Field(default=2.0, gt=0, le=300)  # outbox checks
    alert_webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)  # one POST, all of it
    alert_webhook_backoff_initial_s: float = Field(default=1.0, gt=0)  # after a first failure
    alert_webhook_backoff_max_s: float = Field(default=300.0, gt=0)  # the longest wait

    @field_validator("broker_url", "broker_public_url", "public_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts", "http", "https"} or not parts.hostname:
            raise ValueError(f"{value!r} is not a URL like mqtt://host:1883 or http://host:8000")
        return value.rstrip("/")

    @field_validator("nats_ingest_url")
    @classmethod
    def _check_nats_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            parts = urlsplit(server.strip())
            if parts.scheme not in {"nats", "tls"} or not parts.hostname:
                raise ValueError(f"{server!r} is not a NATS URL like nats://host:4222")
        return value

    @field_validator("artifact_s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"{value!r} is not a URL like https://minio.example.com:9000")
        return value.rstrip("/")

    @field_validator("artifact_s3_bucket")
    @classmethod
    def _check_bucket(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.fullmatch(value):
            raise ValueError(f"{value!r} is not a bucket name (3-63 of a-z 0-9 . - _)")
        return value

    @field_validator("artifact_s3_prefix")
    @classmethod
    def _strip_prefix(cls, value: str) -> str:
        return value.strip("/")

    @model_validator(mode="after")
    def _check_broker_auth(self) -> FleetSettings:
        if self.broker_auth_format == "nats" and self.broker_url is None:
            raise ValueError(
                "broker_auth_format 'nats' needs broker_url (a NATS node's MQTT port): the "
                "embedded broker reads Mosquitto's files"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def resolved_public_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"mqtt://{self.embedded_broker_host}:{self.embedded_broker_port}"

    @property
    def resolved_broker_public_url(self) -> str:
        return self.broker_public_url or self.resolved_broker_url

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_tuf_dir(self) -> Path:
        return self.tuf_dir or self.data_dir / "tuf"

    @property
    def resolved_key_dir(self) -> Path:
        return self.key_dir or self.data_dir / "keys"

    @property
    def resolved_auth_dir(self) -> Path:
        return self.broker_auth_dir or self.data_dir / "broker"
