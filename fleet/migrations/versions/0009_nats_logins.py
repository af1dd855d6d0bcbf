"""Devices' broker passwords in bcrypt too, the form nats-server reads.

Revision ID: 0009_nats_logins
Revises: 0008_leases
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_nats_logins"
down_revision: str | None = "0008_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for devices already enrolled: only their password could fill it, and the
    # controller never kept that. They re-enroll to log in to NATS (docs/broker.md).
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("mqtt_password_bcrypt", sa.String(length=60), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("mqtt_password_bcrypt")
