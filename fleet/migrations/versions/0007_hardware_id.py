"""Devices remember the hardware they run on, so a re-flashed board stays one device.

Revision ID: 0007_hardware_id
Revises: 0006_alert_rules
Create Date: 2026-12-05 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_hardware_id"
down_revision: str | None = "0006_alert_rules"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("hardware_id", sa.String(length=128), nullable=True))
    # Unique, but NULLs never collide (SQLite and PostgreSQL alike): devices enrolled
    # before hardware ids, and agents that cannot read one, keep NULL.
    op.create_index("ix_devices_hardware_id", "devices", ["hardware_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_devices_hardware_id", table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("hardware_id")
