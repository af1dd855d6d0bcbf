"""Rows for rollout members and the audit log."""

from __future__ import annotations

from typing import Any

from fleet.simulate.seed.config import ADMIN_SOURCE
from fleet.simulate.seed.plan import _Fleet


def _member_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    return [
        {
            "rollout_id": rollout.id,
            "device_id": m.device.id,
            "rank": m.rank,
            "stage": m.stage,
            "state": m.state,
            "variant": m.variant,
            "placement": m.placement,
            "target": m.target,
            "previous": m.previous,
            "failure": m.failure,
            "detail": m.detail[:2000],
            "desired_version": m.desired_version,
            "since": m.since or rollout.created_at,
            "issued_at": m.issued_at,
        }
        for rollout in fleet.rollouts.values()
        for m in rollout.members
    ]


def _audit_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = [entry for rollout in fleet.rollouts.values() for entry in rollout.audit]
    for device in fleet.devices:
        if device.revoked_at is not None:
            rows.append(
                {
                    "at": device.revoked_at, "actor": "alice", "action": "device.revoke",
                    "subject": f"device:{device.id}", "reason": "", "data": {},
                    "source": ADMIN_SOURCE,
                }
            )  # fmt: skip
    rows.sort(key=lambda r: (r["at"], r["subject"], r["action"]))
    return rows
