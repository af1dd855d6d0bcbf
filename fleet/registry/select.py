"""Which registered artifact a desired model means (pure: rows in, one row or a reason out).

An admin names a model and perhaps a version and a variant; the device must get
exactly one signed target. The latest version is the newest upload that is not
yanked; a yanked version is never sent to devices, even by name (upload it again
under a new version to bring it back). A version with several variants needs one
chosen, by the admin, by the device's fit, or by being called ``default``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from fleet.errors import Conflict, NotFound

__all__ = ["DEFAULT_VARIANT", "Registered", "choose_artifact"]

DEFAULT_VARIANT = "default"


class Registered(Protocol):
    """What the choice reads of a registry row (``fleet.tables.ModelArtifact``)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def variant(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def yanked_at(self) -> datetime | None: ...

    @property
    def yank_reason(self) -> str: ...


R = TypeVar("R", bound=Registered)


def choose_artifact(
    rows: Sequence[R],
    version: str | None,
    variant: str | None,
    pick: Callable[[Sequence[R]], R] | None = None,
) -> R:
    """The one artifact of ``rows`` (all of one model name) that the admin means.

    ``pick`` chooses among several live variants when none is named (the device's best
    fit, :mod:`fleet.registry.variants`); without it a ``default`` variant is needed.
    """
    name = rows[0].name if rows else "?"
    if version is None:
        live = [r for r in rows if r.yanked_at is None]
        if not live:
            raise Conflict(f"every version of model {name!r} is yanked: push a new one")
        version = max(live, key=lambda r: r.created_at).version
    candidates = [r for r in rows if r.version == version]
    if not candidates:
        known = ", ".join(sorted({r.version for r in rows}))
        raise NotFound(f"model {name!r} has no version {version!r} in the registry ({known})")
    if variant is not None:
        chosen = [r for r in candidates if r.variant == variant]
        if not chosen:
            have = ", ".join(sorted(r.variant for r in candidates))
            raise NotFound(f"{name} {version} has no variant {variant!r} (it has {have})")
        row = chosen[0]
    elif len(candidates) == 1:
        row = candidates[0]
    elif pick is not None:
        row = pick([r for r in candidates if r.yanked_at is None] or candidates)
    else:
        defaults = [r for r in candidates if r.variant == DEFAULT_VARIANT]
        if not defaults:
            have = ", ".join(sorted(r.variant for r in candidates))
            raise Conflict(f"{name} {version} has several variants ({have}): choose one")
        row = defaults[0]
    if row.yanked_at is not None:
        raise Conflict(
            f"{name} {version} ({row.variant}) is yanked ({row.yank_reason or 'no reason given'})"
            ": devices are not sent yanked versions"
        )
    return row
