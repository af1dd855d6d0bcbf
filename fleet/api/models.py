"""The model registry: upload model files, list and show versions, yank them.

An upload is the raw file as the request body (``application/octet-stream``, not
multipart), streamed into the artifact store while it is hashed; it is the one route
exempt from the 1 MiB body limit (:func:`is_upload`). What the uploader says about the
file travels as JSON in the ``X-Edgefleet-Metadata`` header; the model card, which
can be long, has its own route. The work is :mod:`fleet.registry.registration`'s: 201
when new, 200 when identical, 409 otherwise.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import ValidationError
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from fleet.api.audited import audit_action
from fleet.api.deps import PrincipalDep, SessionDep, StateDep, authorize
from fleet.api.errors import validation_message
from fleet.api.present import utc
from fleet.api.schemas import (
    VARIANT_PATTERN,
    ArtifactPublic,
    ModelMetadata,
    ModelSummary,
    ModelVersionPublic,
    YankBody,
)
from fleet.errors import InvalidInput
from fleet.registry import registration
from fleet.registry.registration import Upload, by_version, rows_of
from fleet.registry.select import DEFAULT_VARIANT
from fleet.tables import ModelArtifact, as_utc
from models.manifest import ModelFormat
from models.paths import artifact_path
from models.values import MODEL_NAME_PATTERN, VERSION_PATTERN

__all__ = ["METADATA_HEADER", "artifact_public", "is_upload", "router"]

router = APIRouter(prefix="/api/v1", tags=["models"], dependencies=[authorize()])

METADATA_HEADER = "X-Edgefleet-Metadata"
MAX_CARD_BYTES = 256 * 1024

_UPLOAD_PATH = re.compile(r"^/api/v1/models/[^/]+/versions/[^/]+/?$")

NameParam = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]
VersionParam = Annotated[str, Path(pattern=VERSION_PATTERN)]


def is_upload(scope: Scope) -> bool:
    """The upload route, which streams its body to disk instead of buffering it."""
    return scope.get("method") == "POST" and bool(_UPLOAD_PATH.match(scope.get("path", "")))


def artifact_public(row: ModelArtifact, public_url: str) -> ArtifactPublic:
    return ArtifactPublic(
        name=row.name,
        version=row.version,
        variant=row.variant,
        format=ModelFormat(row.format),
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        metadata=ModelMetadata.model_validate(row.meta),
        created_at=utc(row.created_at),
        yanked=row.yanked_at is not None,
        yanked_at=as_utc(row.yanked_at),
        yank_reason=row.yank_reason,
        download_url=public_url + artifact_path(row.sha256),
    )


def _version_public(rows: list[ModelArtifact], public_url: str) -> ModelVersionPublic:
    return ModelVersionPublic(
        name=rows[0].name,
        version=rows[0].version,
        yanked=all(r.yanked_at is not None for r in rows),
        artifacts=[artifact_public(r, public_url) for r in sorted(rows, key=lambda r: r.variant)],
    )


def _declared_length(request: Request) -> int | None:
    """Content-Length, read from the headers: framing, not a parameter of the operation."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidInput(f"Content-Length {raw[:40]!r} is not a number of bytes")
    return int(raw)


def _parse_metadata(raw: str | None) -> ModelMetadata:
    if raw is None or not raw.strip():
        return ModelMetadata()
    try:
        return ModelMetadata.model_validate_json(raw)
    except ValidationError as exc:
        message = validation_message(list(exc.errors()))
        raise InvalidInput(f"{METADATA_HEADER}: {message}") from None


@router.post("/models/{name}/versions/{version}", status_code=201)
async def upload_model(
    name: NameParam,
    version: VersionParam,
    request: Request,
    response: Response,
    state: StateDep,
    session: SessionDep,
    who: PrincipalDep,
    variant: Annotated[str, Query(pattern=VARIANT_PATTERN)] = DEFAULT_VARIANT,
    format: Annotated[ModelFormat | None, Query()] = None,
    filename: Annotated[str | None, Query(max_length=255)] = None,
    content_type: Annotated[str | None, Header()] = None,
    x_edgefleet_metadata: Annotated[str | None, Header()] = None,
) -> ArtifactPublic:
    """Stream a model file into the registry: 201 when new, 200 when identical, 409 otherwise."""
    if (content_type or "").split(";")[0].strip().lower() != "application/octet-stream":
        raise InvalidInput("send the raw file with Content-Type: application/octet-stream")
    upload = Upload(
        name=name,
        version=version,
        variant=variant,
        format=format,
        filename=filename,
        length=_declared_length(request),
        meta=_parse_metadata(x_edgefleet_metadata).model_dump(mode="json"),
    )
    store = registration.artifact_store(state.settings)
    try:
        saved, created = await registration.register_upload(
            state.engine, store, state.tuf, upload, request.stream(), state.clock()
        )
    except ClientDisconnect:
        raise InvalidInput("the upload was interrupted") from None
    if not created:
        response.status_code = 200
    else:
        audit_action(
            session, who, state.clock(), "model.upload", f"model:{name}",
            version=version, variant=variant, sha256=saved.sha256,
        )  # fmt: skip
        session.commit()
    return artifact_public(saved, state.settings.resolved_public_url)


@router.get("/models")
def list_models(session: SessionDep) -> list[ModelSummary]:
    """Every model, by name, with its latest version that is not yanked."""
    rows = session.exec(select(ModelArtifact).order_by(col(ModelArtifact.name))).all()
    by_name: dict[str, list[ModelArtifact]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    result = []
    for name, named in by_name.items():
        versions = by_version(named)
        live = [g for g in versions if any(r.yanked_at is None for r in g)]
        latest = live[0] if live else None
        result.append(
            ModelSummary(
                name=name,
                latest_version=latest[0].version if latest else None,
                latest_variants=sorted(r.variant for r in latest or [] if r.yanked_at is None),
                versions=len(versions),
                updated_at=max(utc(r.created_at) for r in named),
            )
        )
    return result


@router.get("/models/{name}")
def show_model(name: NameParam, session: SessionDep, state: StateDep) -> list[ModelVersionPublic]:
    """A model's versions, newest upload first, each with its variants."""
    public_url = state.settings.resolved_public_url
    return [_version_public(g, public_url) for g in by_version(rows_of(session, name))]


@router.get("/models/{name}/versions/{version}")
def show_version(
    name: NameParam, version: VersionParam, session: SessionDep, state: StateDep
) -> ModelVersionPublic:
    return _version_public(rows_of(session, name, version), state.settings.resolved_public_url)


@router.post("/models/{name}/versions/{version}/yank")
def yank_version(
    name: NameParam,
    version: VersionParam,
    body: YankBody,
    session: SessionDep,
    state: StateDep,
    who: PrincipalDep,
) -> ModelVersionPublic:
    """Withdraw a version (or one variant): no longer latest, still downloadable.

    Idempotent: variants already yanked keep their first time and reason.
    """
    rows = registration.yank(session, name, version, body.variant, body.reason, state.clock())
    audit_action(
        session, who, state.clock(), "model.yank", f"model:{name}", body.reason,
        version=version, variant=body.variant,
    )  # fmt: skip
    session.commit()
    return _version_public(rows, state.settings.resolved_public_url)


@router.put("/models/{name}/versions/{version}/card")
async def set_card(
    name: NameParam,
    version: VersionParam,
    request: Request,
    state: StateDep,
    session: SessionDep,
    who: PrincipalDep,
    variant: Annotated[str | None, Query(pattern=VARIANT_PATTERN)] = None,
) -> ModelVersionPublic:
    """Replace the model card (Markdown, the raw body) of a version's variants (or one)."""
    raw = await request.body()
    if len(raw) > MAX_CARD_BYTES:
        raise InvalidInput(f"the model card is larger than {MAX_CARD_BYTES} bytes")
    try:
        card = raw.decode()
    except UnicodeDecodeError:
        raise InvalidInput("the model card is not UTF-8 text") from None
    rows = await run_in_threadpool(
        registration.set_card, state.engine, name, version, variant, card
    )
    audit_action(
        session, who, state.clock(), "model.card", f"model:{name}", version=version, variant=variant
    )
    session.commit()
    return _version_public(rows, state.settings.resolved_public_url)
