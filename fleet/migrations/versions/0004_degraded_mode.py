"""Degraded mode: fallback policies, their assignments, alerts, fallbacks in telemetry.

Revision ID: 0004_degraded_mode
Revises: 0003_rollouts
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004_degraded_mode"
down_revision: str | None = "0003_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _stamp(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "fallback_policies",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=2000), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _stamp("created_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_fallback_policies_version"),
    )
    op.create_index("ix_fallback_policies_name", "fallback_policies", ["name"])
    op.create_table(
        "policy_assignments",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("assigned_by", sa.String(length=64), nullable=False),
        _stamp("assigned_at"),
        sa.PrimaryKeyConstraint("scope", "target"),
    )
    op.create_index("ix_policy_assignments_policy", "policy_assignments", ["policy"])
    op.create_table(
        "alerts",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=160), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.String(length=2000), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        _stamp("raised_at"),
        _stamp("updated_at"),
        _stamp("cleared_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alerts_open", "alerts", ["kind", "subject", "cleared_at"])
    with op.batch_alter_table("telemetry") as batch:
        batch.add_column(sa.Column("fallbacks", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("fallbacks_by_tier", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_column("fallbacks_by_tier")
        batch.drop_column("fallbacks")
    op.drop_index("ix_alerts_open", table_name="alerts")
    op.drop_table("alerts")
    op.drop_index("ix_policy_assignments_policy", table_name="policy_assignments")
    op.drop_table("policy_assignments")
    op.drop_index("ix_fallback_policies_name", table_name="fallback_policies")
    op.drop_table("fallback_policies")
