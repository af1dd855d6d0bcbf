"""Initial schema: groups, devices, tags, enrollment tokens, telemetry, events.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _stamp(name: str, *, nullable: bool) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        _stamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("group", sa.String(length=64), nullable=True),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=True),
        sa.Column("mqtt_password_hash", sa.String(length=256), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.Column("device_report", sa.JSON(), nullable=True),
        _stamp("enrolled_at", nullable=False),
        _stamp("revoked_at", nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        _stamp("last_seen", nullable=True),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=True),
        sa.Column("reported", sa.JSON(), nullable=True),
        _stamp("reported_at", nullable=True),
        sa.Column("telemetry_dropped", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["group"], ["groups.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("public_key"),
    )
    op.create_index("ix_devices_group", "devices", ["group"])
    op.create_index("ix_devices_online", "devices", ["online"])
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id", "tag"),
    )
    op.create_index("ix_device_tags_tag", "device_tags", ["tag"])
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("group", sa.String(length=64), nullable=True),
        sa.Column("uses_total", sa.Integer(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        _stamp("created_at", nullable=False),
        _stamp("expires_at", nullable=True),
        _stamp("revoked_at", nullable=True),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["group"], ["groups.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_sha256"),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("sample_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        _stamp("ts", nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("rejections", sa.Integer(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("ttft_p50_ms", sa.Float(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("queue_depth", sa.Integer(), nullable=False),
        sa.Column("model_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("process_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gpu_utilization_percent", sa.Float(), nullable=True),
        sa.Column("gpu_memory_used_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gpu_temperature_c", sa.Float(), nullable=True),
        sa.Column("gpu_power_w", sa.Float(), nullable=True),
        _stamp("sent_at", nullable=False),
        _stamp("stored_at", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "sample_id", name="uq_telemetry_device_sample"),
    )
    op.create_index("ix_telemetry_device_ts", "telemetry", ["device_id", "ts"])
    op.create_index("ix_telemetry_ts", "telemetry", ["ts"])
    op.create_table(
        "events",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        _stamp("ts", nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.String(length=2000), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        _stamp("stored_at", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "event_id", name="uq_events_device_event"),
    )
    op.create_index("ix_events_device_ts", "events", ["device_id", "ts"])


def downgrade() -> None:
    op.drop_index("ix_events_device_ts", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_telemetry_ts", table_name="telemetry")
    op.drop_index("ix_telemetry_device_ts", table_name="telemetry")
    op.drop_table("telemetry")
    op.drop_table("enrollment_tokens")
    op.drop_index("ix_device_tags_tag", table_name="device_tags")
    op.drop_table("device_tags")
    op.drop_index("ix_devices_online", table_name="devices")
    op.drop_index("ix_devices_group", table_name="devices")
    op.drop_table("devices")
    op.drop_table("groups")
