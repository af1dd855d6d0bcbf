"""TUF metadata for devices, and the admin routes of the offline signing flow.

``GET /api/v1/tuf/{filename}`` serves ``N.root.json``, ``N.targets.json``,
``N.snapshot.json`` and ``timestamp.json`` (and the current ``root.json``,
``targets.json``, ``snapshot.json``) to devices, authenticated like artifact downloads
(HTTP Basic: device id and broker password; or the admin token). Any other name is a
404, so no request can reach another file.

The admin routes carry metadata to and from the machine holding the offline keys:
fetch the staged (unsigned) next targets or root, sign it there with ``edgefleet keys
sign``, and ``PUT`` it back. Imports stream their body with their own cap, since a
targets file listing many models may pass the 1 MiB limit of other routes.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from fleet.api.artifacts import require_reader
from fleet.api.audited import audit_action
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, TufDep, authorize
from fleet.auth import Role
from fleet.errors import TooLarge
from fleet.registry.repository import MAX_METADATA_BYTES, METADATA_FILE, RoleStatus
from models.paths import TUF_PATH

__all__ = ["RoleStatusPublic", "TufStatusPublic", "is_metadata_import", "router"]

router = APIRouter(prefix=TUF_PATH, tags=["tuf"])
_ADMIN = authorize(read=Role.ADMIN, write=Role.ADMIN)  # staged metadata, key changes

JSON = "application/json"
_IMPORT_PATH = re.compile(rf"^{re.escape(TUF_PATH)}/(targets|root)/?$")


def is_metadata_import(scope: Scope) -> bool:
    """The import routes, which stream their body under their own (larger) cap."""
    return scope.get("method") == "PUT" and bool(_IMPORT_PATH.match(scope.get("path", "")))


class RoleStatusPublic(BaseModel):
    """One role's keys, threshold, version and expiry."""

    role: str
    version: int | None
    expires: datetime | None
    keyids: list[str]
    threshold: int
    online: list[str]  # key ids whose private keys the controller holds


class TufStatusPublic(BaseModel):
    """The whole repository, and what waits for offline signatures."""

    roles: list[RoleStatusPublic]
    staged_targets_version: int | None
    staged_root_version: int | None


def _role_public(status: RoleStatus) -> RoleStatusPublic:
    return RoleStatusPublic(
        role=status.role,
        version=status.version,
        expires=status.expires,
        keyids=list(status.keyids),
        threshold=status.threshold,
        online=list(status.online),
    )


async def _body(request: Request) -> bytes:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_METADATA_BYTES:
            raise TooLarge(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    return bytes(data)


@router.get("/status", dependencies=[authorize()])
def tuf_status(tuf: TufDep) -> TufStatusPublic:
    """Every role's version, expiry, keys and threshold; what is staged for offline signing."""
    return TufStatusPublic(
        roles=[_role_public(s) for s in tuf.status()],
        staged_targets_version=tuf.staged_targets_version(),
        staged_root_version=tuf.staged_root_version(),
    )


@router.get("/staged/targets.json", dependencies=[_ADMIN])
def staged_targets(tuf: TufDep, state: StateDep) -> Response:
    """The next targets metadata, unsigned, for the offline targets keys to sign."""
    return Response(tuf.staged_targets(state.clock()), media_type=JSON)


@router.get("/staged/root.json", dependencies=[_ADMIN])
def staged_root(tuf: TufDep) -> Response:
    """The staged next root (a rotation waiting for offline root signatures)."""
    return Response(tuf.staged_root(), media_type=JSON)


@router.put("/targets", dependencies=[_ADMIN])
async def import_targets(
    request: Request, tuf: TufDep, state: StateDep, session: SessionDep, who: PrincipalDep
) -> dict[str, Any]:
    """Publish targets metadata signed offline (with new snapshot and timestamp)."""
    data = await _body(request)
    version = await run_in_threadpool(tuf.import_targets, data, state.clock())
    audit_action(session, who, state.clock(), "tuf.import", "tuf:targets", version=version)
    session.commit()
    return {"role": "targets", "version": version}


@router.put("/root", dependencies=[_ADMIN])
async def import_root(
    request: Request, tuf: TufDep, state: StateDep, session: SessionDep, who: PrincipalDep
) -> dict[str, Any]:
    """Publish a root signed offline by the old and the new root keys."""
    data = await _body(request)
    version = await run_in_threadpool(tuf.import_root, data, state.clock())
    audit_action(session, who, state.clock(), "tuf.import", "tuf:root", version=version)
    session.commit()
    return {"role": "root", "version": version}


@router.get("/{filename}")
def metadata(
    filename: Annotated[str, Path(max_length=64)],
    _reader: Annotated[str, Depends(require_reader)],
    tuf: TufDep,
) -> Response:
    """One metadata file; versioned ones never change, so caches may keep them."""
    data = tuf.read(filename)
    match = METADATA_FILE.fullmatch(filename)
    versioned = match is not None and match.group(1) is not None
    cache = "private, max-age=31536000, immutable" if versioned else "no-cache"
    return Response(data, media_type=JSON, headers={"Cache-Control": cache})
