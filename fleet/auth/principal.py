"""Who sent a request, as the routes and the audit log see them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fleet.auth.roles import Role

__all__ = ["ADMIN_TOKEN_ACTOR", "Principal", "Via"]

Via = Literal["session", "api-token", "admin-token"]
ADMIN_TOKEN_ACTOR = "admin"  # noqa: S105  the controller's own admin token (<data_dir>/admin-token)


@dataclass(frozen=True)
class Principal:
    """A signed-in user, or the holder of the controller's admin token."""

    name: str  # the user's name; "admin" (or "admin:<X-Edgefleet-Actor>") for the admin token
    role: Role
    via: Via
    address: str = ""  # the client's address, as the server saw it
    user_id: int | None = None  # None: the admin token
    csrf_token: str | None = None  # sessions only: unsafe requests must send it back

    @property
    def source(self) -> str:
        """Where an action came from, for the audit log."""
        return f"{self.address or 'unknown'} ({self.via})"
