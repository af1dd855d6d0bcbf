"""The model registry as the dashboard shows it: versions, variants, signatures, devices.

An artifact's signature status is read from the TUF repository: *signed* when the
published targets metadata lists its path with its sha256 (devices will install it),
*staged* when only the staged targets hold it (waiting for the offline targets keys),
*unsigned* otherwise. Which devices run what comes from their reports, counted in
SQL (:func:`fleet.dashboard.views.fleet.fleet_models`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from fleet.api.schemas import ArtifactPublic
from fleet.dashboard.views.fleet import FleetModel
from fleet.registry.repository import RoleStatus
from fleet.registry.targets import target_path

__all__ = [
    "RoleView",
    "Signature",
    "VariantView",
    "VersionView",
    "requirements_of",
    "role_views",
    "signature_of",
    "time_left",
    "version_views",
]

Signature = Literal["signed", "staged", "unsigned", "mismatch"]


def signature_of(
    artifact: ArtifactPublic, published: Mapping[str, str], staged: Callable[[str], bool]
) -> Signature:
    """``published``: target path -> sha256, signed; ``staged(path)``: in the staged targets."""
    path = target_path(artifact.name, artifact.version, artifact.variant, artifact.format.value)
    signed = published.get(path)
    if signed is not None:
        return "signed" if signed == artifact.sha256 else "mismatch"
    return "staged" if staged(path) else "unsigned"


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def requirements_of(artifact: ArtifactPublic) -> list[str]:
    """What a device needs to be offered this variant, in words; empty: nothing special."""
    meta = artifact.metadata
    needs = meta.requirements
    lines = []
    if meta.ram_bytes is not None:
        lines.append(f"RAM {_gib(meta.ram_bytes)} (on CPU)")
    if meta.vram_bytes is not None:
        lines.append(f"GPU memory {_gib(meta.vram_bytes)} (all layers offloaded)")
    if needs.gpu != "preferred":
        lines.append("GPU required" if needs.gpu == "required" else "CPU only")
    if needs.arch:
        lines.append("arch " + " or ".join(needs.arch))
    if needs.min_compute_capability:
        lines.append(f"compute capability ≥ {needs.min_compute_capability}")
    if needs.min_l4t:
        lines.append(f"L4T ≥ {needs.min_l4t}")
    lines.extend(f"{name} ≥ {version}" for name, version in sorted(needs.runtimes.items()))
    return lines


@dataclass(frozen=True)
class VariantView:
    """One variant of a version, with what it needs and whether devices may trust it."""

    artifact: ArtifactPublic
    signature: Signature
    requirements: list[str]


@dataclass(frozen=True)
class VersionView:
    """One version: its variants, its model card, and how many devices report running it."""

    version: str
    yanked: bool
    created_at: datetime
    variants: list[VariantView]
    devices: int
    card: str  # Markdown, shown as text; "" when none was set


def version_views(
    versions: Sequence[Sequence[ArtifactPublic]],
    published: Mapping[str, str],
    staged: Callable[[str], bool],
    running: Sequence[FleetModel],
) -> list[VersionView]:
    """``versions`` newest first, as the registry lists them; see :func:`signature_of`."""
    devices = {m.version: m.devices for m in running}
    views = []
    for artifacts in versions:
        variants = [
            VariantView(
                artifact=a,
                signature=signature_of(a, published, staged),
                requirements=requirements_of(a),
            )
            for a in artifacts
        ]
        card = next((a.metadata.card for a in artifacts if a.metadata.card), "")
        views.append(
            VersionView(
                version=artifacts[0].version,
                yanked=all(a.yanked for a in artifacts),
                created_at=max(a.created_at for a in artifacts),
                variants=variants,
                devices=devices.get(artifacts[0].version, 0),
                card=card,
            )
        )
    return views


@dataclass(frozen=True)
class RoleView:
    """One TUF role: version, expiry, keys; ``state`` says whether someone must act."""

    role: str
    version: int | None
    expires: datetime | None
    threshold: int
    keys: int
    online: int  # of those keys, how many the controller holds
    state: Literal["ok", "soon", "expired"]
    left: str | None  # "364 days", "23 h", "45 min"; None: no expiry of its own


def time_left(seconds: float) -> str:
    """How long until an expiry, for people: days beyond two days, hours beyond two hours."""
    if seconds >= 2 * 86_400:
        return f"{int(seconds // 86_400)} days"
    if seconds >= 2 * 3600:
        return f"{int(seconds // 3600)} h"
    return f"{max(0, int(seconds // 60))} min"


def role_views(
    statuses: Sequence[RoleStatus], now: datetime, warn_days: Callable[[str], float | None]
) -> list[RoleView]:
    """``warn_days(role)``: the ``tuf_expiry`` alert's threshold, so page and alert agree.

    The controller re-signs online roles at half their lifetime, so the timestamp (one
    day) always has less than a week left: only the rule's own threshold means trouble.
    """
    views = []
    for status in statuses:
        expires = status.expires
        days = warn_days(status.role)
        state: Literal["ok", "soon", "expired"] = "ok"
        if expires is not None and expires <= now:
            state = "expired"
        elif expires is not None and days is not None and expires - now <= timedelta(days=days):
            state = "soon"
        views.append(
            RoleView(
                role=status.role,
                version=status.version,
                expires=expires,
                threshold=status.threshold,
                keys=len(status.keyids),
                online=len(status.online),
                state=state,
                left=None if expires is None else time_left((expires - now).total_seconds()),
            )
        )
    return views
