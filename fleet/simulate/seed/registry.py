"""Rows for the registry and its users: model artifacts, and the audit trail's people."""

from __future__ import annotations

import random
from typing import Any

from argon2 import PasswordHasher
from argon2.low_level import hash_secret

from fleet.simulate.seed.config import DAY, SEED_PASSWORD, USERS
from fleet.simulate.seed.plan import _Fleet


def _user_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    """The people of the audit trail, with argon2id hashes as the dashboard makes them."""
    hasher = PasswordHasher()
    rng = random.Random(f"{fleet.config.seed}:users")  # noqa: S311 (a fixed salt: same rows)
    rows = []
    for name, role in USERS.items():
        encoded = hash_secret(
            SEED_PASSWORD.encode(),
            rng.randbytes(hasher.salt_len),
            time_cost=hasher.time_cost,
            memory_cost=hasher.memory_cost,
            parallelism=hasher.parallelism,
            hash_len=hasher.hash_len,
            type=hasher.type,
        ).decode()
        created = fleet.now - 400 * DAY
        rows.append(
            {
                "name": name, "role": role, "password_hash": encoded, "disabled": False,
                "created_by": "admin", "created_at": created, "password_changed_at": created,
            }
        )  # fmt: skip
    return rows


def _artifact_rows(fleet: _Fleet) -> list[dict[str, Any]]:
    rows = []
    for a in fleet.artifacts:
        yanked, why = fleet.yanked.get((a.name, a.version), (None, ""))
        rows.append(
            {
                "name": a.name, "version": a.version, "variant": a.variant, "format": a.format,
                "sha256": a.sha256, "size_bytes": a.size_bytes, "metadata": a.meta,
                "created_at": a.created_at, "yanked_at": yanked, "yank_reason": why,
            }
        )  # fmt: skip
    return rows
