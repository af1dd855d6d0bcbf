"""Model files for devices: ``GET /api/v1/artifacts/{sha256}``, with HTTP Range for resume.

A device authenticates with HTTP Basic: its id and its broker password (checked
against the stored Mosquitto hash); a revoked device is refused. Admins may use
their Bearer token. Only digests some registered artifact names are served, yanked
ones included (a rollback may need them; ``X-Edgefleet-Yanked`` says so). Starlette's
``FileResponse`` answers Range requests (206, ``Content-Range``, 416) itself. A file
whose bytes no longer match its digest is quarantined and answered with 503
``artifact_corrupt``, never served.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse
from sqlmodel import Session, col, select

from fleet.api.deps import StateDep
from fleet.auth.api_tokens import resolve_token
from fleet.errors import Forbidden, NotFound, Unauthorized
from fleet.link.passwords import hash_password, verify_password
from fleet.registry.registration import artifact_store
from fleet.registry.store import check_digest
from fleet.tables import Device, ModelArtifact
from fleet.tokens import same_secret
from models.paths import ARTIFACTS_PATH

__all__ = ["ADMIN_READER", "BASIC_CHALLENGE", "require_reader", "router"]

router = APIRouter(prefix=ARTIFACTS_PATH, tags=["artifacts"])

ADMIN_READER = "admin"  # what require_reader returns for the admin token
BASIC_CHALLENGE = 'Basic realm="edgefleet artifacts"'
_NO_SUCH_DEVICE_HASH = hash_password("no such device")  # verified against, to even out timing


def _basic(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials", challenge=BASIC_CHALLENGE) from None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        raise Unauthorized("malformed Basic credentials", challenge=BASIC_CHALLENGE)
    return user, password


def require_reader(request: Request, state: StateDep) -> str:
    """Who may download: a device (Basic id:broker-password) or a person (Bearer); who."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        if same_secret(value.strip(), state.admin_token):
            return ADMIN_READER
        with Session(state.engine) as session:
            user = resolve_token(session, value.strip(), state.clock())
        if user is None:
            raise Unauthorized("unknown, revoked or expired token")
        return user.name
    if scheme.lower() != "basic" or not value.strip():
        raise Unauthorized(
            "send the device's id and broker password with HTTP Basic",
            challenge=BASIC_CHALLENGE,
        )
    device_id, password = _basic(value.strip())
    with Session(state.engine) as session:
        device = session.get(Device, device_id)
    encoded = device.mqtt_password_hash if device is not None else _NO_SUCH_DEVICE_HASH
    if not verify_password(password, encoded) or device is None:
        raise Unauthorized("wrong device id or password", challenge=BASIC_CHALLENGE)
    if device.revoked_at is not None:
        raise Forbidden(f"device {device_id} is revoked")
    return device_id


Reader = Annotated[str, Depends(require_reader)]


@router.head("/{sha256}", response_class=FileResponse, operation_id="artifact_head")
@router.get("/{sha256}", response_class=FileResponse, operation_id="artifact_download")
def download_artifact(
    sha256: Annotated[str, Path(max_length=64)], _reader: Reader, state: StateDep
) -> FileResponse:
    """The file with that SHA-256, resumable with ``Range: bytes=a-b`` or ``bytes=a-``."""
    digest = check_digest(sha256)
    with Session(state.engine) as session:
        rows = session.exec(
            select(ModelArtifact.yanked_at).where(col(ModelArtifact.sha256) == digest)
        ).all()
    if not rows:
        raise NotFound(f"no artifact {digest}")
    path = artifact_store(state.settings).verified_path(digest)  # hashed unless unchanged
    headers = {
        "ETag": f'"{digest}"',
        "Cache-Control": "private, max-age=31536000, immutable",  # content-addressed
        "X-Edgefleet-Yanked": "true" if all(r is not None for r in rows) else "false",
    }
    return FileResponse(path, media_type="application/octet-stream", headers=headers)
