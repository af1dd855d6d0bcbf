"""Model files for devices: ``GET /api/v1/artifacts/{sha256}``, with HTTP Range for resume.

A device authenticates with HTTP Basic: its id and its broker password (checked
against the stored Mosquitto hash); a revoked device is refused. Admins may use
their Bearer token. Only digests some registered artifact names are served, yanked
ones included (a rollback may need them; ``X-Edgefleet-Yanked`` says so). From the
folder backend, Starlette's ``FileResponse`` answers Range requests (206,
``Content-Range``, 416) itself; from S3 the controller streams the object, one range
(:func:`requested_span`) or all of it, so devices need no S3 credentials. A blob whose
bytes no longer match its digest is quarantined and answered with 503
``artifact_corrupt``, never served.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlmodel import Session, col, select

from fleet.api.deps import StateDep
from fleet.auth.api_tokens import resolve_token
from fleet.errors import Forbidden, NotFound, Unauthorized
from fleet.link.passwords import hash_password, verify_password
from fleet.registry.blobs import BlobStat
from fleet.registry.registration import artifact_store
from fleet.registry.store import ArtifactStore, check_digest
from fleet.tables import Device, ModelArtifact
from fleet.tokens import same_secret
from models.paths import ARTIFACTS_PATH

__all__ = ["ADMIN_READER", "BASIC_CHALLENGE", "Span", "requested_span", "require_reader", "router"]

router = APIRouter(prefix=ARTIFACTS_PATH, tags=["artifacts"])

ADMIN_READER = "admin"  # what require_reader returns for the admin token
BASIC_CHALLENGE = 'Basic realm="edgefleet artifacts"'
_NO_SUCH_DEVICE_HASH = hash_password("no such device")  # verified against, to even out timing
OCTET_STREAM = "application/octet-stream"


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


Span = tuple[int, int]  # bytes [start, end) of an artifact
_ONE_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def requested_span(
    range_header: str | None, if_range: str | None, etag: str, size: int
) -> Span | Literal["whole", "unsatisfiable"]:
    """What a ``Range`` header asks of ``size`` bytes: one span, all of them, or nothing.

    One range only (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), answered as Starlette's
    ``FileResponse`` answers it. Several ranges, a malformed header, or an ``If-Range``
    that is not this strong ETag ask for the whole artifact (RFC 9110 lets a server
    ignore a Range). A start at or past the end is unsatisfiable (416).
    """
    found = _ONE_RANGE.fullmatch(range_header or "")
    if found is None or not (found[1] or found[2]):
        return "whole"
    if if_range is not None and if_range.strip() != etag:
        return "whole"
    first, last = found[1], found[2]
    if not first:  # the last n bytes
        n = int(last)
        return "unsatisfiable" if n == 0 or size == 0 else (max(size - n, 0), size)
    start = int(first)
    if last and int(last) < start:
        return "whole"
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last) + 1, size) if last else size


def _streamed(
    request: Request, store: ArtifactStore, digest: str, blob: BlobStat, headers: dict[str, str]
) -> Response:
    """An artifact the controller reads from its backend in pieces: all, or one range."""
    size = blob.size
    span = requested_span(
        request.headers.get("range"), request.headers.get("if-range"), headers["ETag"], size
    )
    if span == "unsatisfiable":
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    status, (start, end) = (200, (0, size)) if span == "whole" else (206, span)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=OCTET_STREAM)
    return StreamingResponse(
        store.chunks(digest, blob, start, end),
        status_code=status,
        headers=headers,
        media_type=OCTET_STREAM,
    )


@router.head("/{sha256}", response_class=FileResponse, operation_id="artifact_head")
@router.get("/{sha256}", response_class=FileResponse, operation_id="artifact_download")
def download_artifact(
    sha256: Annotated[str, Path(max_length=64)], request: Request, _reader: Reader, state: StateDep
) -> Response:
    """The file with that SHA-256, resumable with ``Range: bytes=a-b`` or ``bytes=a-``."""
    digest = check_digest(sha256)
    with Session(state.engine) as session:
        rows = session.exec(
            select(ModelArtifact.yanked_at).where(col(ModelArtifact.sha256) == digest)
        ).all()
    if not rows:
        raise NotFound(f"no artifact {digest}")
    store = artifact_store(state.settings)
    blob = store.verified(digest)  # hashed unless unchanged since
    headers = {
        "ETag": f'"{digest}"',
        "Cache-Control": "private, max-age=31536000, immutable",  # content-addressed
        "X-Edgefleet-Yanked": "true" if all(r is not None for r in rows) else "false",
    }
    if blob.local is not None:
        return FileResponse(blob.local, media_type=OCTET_STREAM, headers=headers)
    return _streamed(request, store, digest, blob, headers)
