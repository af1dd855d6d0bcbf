"""The model registry: upload model files, list and show versions, yank them.

An upload is the raw file as the request body (``application/octet-stream``, not
multipart), streamed into the artifact store while it is hashed, so a multi-GB file
never sits in memory; it is the one route exempt from the 1 MiB body limit
(:func:`is_upload`). What the uploader says about the file travels as JSON in the
``X-Edgefleet-Metadata`` header; the model card, which can be long, has its own route.
One row per (name, version, variant): the same bytes again are a no-op, other bytes
a 409. A registered artifact becomes a TUF target (:func:`artifact_target`): signed at
once when the targets keys are online, staged for offline signing otherwise.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from fleet.api.deps import Admin, FleetState, SessionDep, StateDep
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
from fleet.config import FleetSettings
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.registry.select import DEFAULT_VARIANT
from fleet.registry.store import ArtifactStore, Ingested
from fleet.registry.targets import TargetDescription, describe_target
from fleet.tables import ModelArtifact, as_utc
from models.manifest import ModelFormat
from models.paths import artifact_path
from models.values import MODEL_NAME_PATTERN, VERSION_PATTERN

__all__ = [
    "DEFAULT_VARIANT",
    "GGUF_MAGIC",
    "METADATA_HEADER",
    "artifact_public",
    "artifact_store",
    "artifact_target",
    "is_upload",
    "router",
]

router = APIRouter(prefix="/api/v1", tags=["models"], dependencies=[Admin])

GGUF_MAGIC = b"GGUF"
METADATA_HEADER = "X-Edgefleet-Metadata"
MAX_CARD_BYTES = 256 * 1024

_UPLOAD_PATH = re.compile(r"^/api/v1/models/[^/]+/versions/[^/]+/?$")

NameParam = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]
VersionParam = Annotated[str, Path(pattern=VERSION_PATTERN)]


def is_upload(scope: Scope) -> bool:
    """The upload route, which streams its body to disk instead of buffering it."""
    return scope.get("method") == "POST" and bool(_UPLOAD_PATH.match(scope.get("path", "")))


def artifact_store(settings: FleetSettings) -> ArtifactStore:
    return ArtifactStore(settings.resolved_artifact_dir, max_bytes=settings.artifact_max_bytes)


def artifact_target(row: ModelArtifact) -> TargetDescription:
    """The TUF target a registered artifact is signed as."""
    return describe_target(
        name=row.name,
        version=row.version,
        variant=row.variant,
        fmt=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        metadata=row.meta,
    )


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


class _FormatSniffer:
    """Looks at an upload's first bytes: refuses what cannot be the declared format."""

    def __init__(self, declared: ModelFormat | None, filename: str | None) -> None:
        self.declared = declared
        self.onnx_by_name = filename is not None and filename.lower().endswith(".onnx")
        self.found: ModelFormat | None = None

    def __call__(self, head: bytes) -> None:
        if not head:
            raise InvalidInput("the upload is empty")
        if head.startswith(GGUF_MAGIC):
            if self.declared is ModelFormat.ONNX:
                raise InvalidInput("the file is GGUF (it starts with 'GGUF'), not ONNX")
            self.found = ModelFormat.GGUF
        elif self.declared is ModelFormat.GGUF:
            raise InvalidInput("not a GGUF file: GGUF files start with the bytes 'GGUF'")
        elif self.declared is ModelFormat.ONNX or self.onnx_by_name:
            self.found = ModelFormat.ONNX  # protobuf has no magic: trust the declaration
        else:
            raise InvalidInput(
                "cannot tell the file's format: GGUF files start with 'GGUF'; "
                "for ONNX pass format=onnx or a filename ending in .onnx"
            )


def _parse_metadata(raw: str | None) -> ModelMetadata:
    if raw is None or not raw.strip():
        return ModelMetadata()
    try:
        return ModelMetadata.model_validate_json(raw)
    except ValidationError as exc:
        message = validation_message(list(exc.errors()))
        raise InvalidInput(f"{METADATA_HEADER}: {message}") from None


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "card"}


def _find(session: Session, name: str, version: str, variant: str) -> ModelArtifact | None:
    return session.exec(
        select(ModelArtifact).where(
            col(ModelArtifact.name) == name,
            col(ModelArtifact.version) == version,
            col(ModelArtifact.variant) == variant,
        )
    ).first()


def _same_or_conflict(existing: ModelArtifact, sha256: str, meta: dict[str, Any]) -> None:
    where = f"{existing.name} {existing.version} ({existing.variant})"
    if existing.sha256 != sha256:
        raise Conflict(
            f"{where} is already registered with other content (sha256 {existing.sha256}): "
            "upload it as a new version"
        )
    if _comparable(existing.meta) != _comparable(meta):
        raise Conflict(f"{where} is already registered with other metadata: use a new version")


def _precheck(engine: Engine, name: str, version: str, variant: str, length: int | None) -> None:
    """Refuse before reading the body when the declared length already tells it differs."""
    if length is None:
        return
    with Session(engine) as session:
        existing = _find(session, name, version, variant)
    if existing is not None and existing.size_bytes != length:
        raise Conflict(
            f"{name} {version} ({variant}) is already registered with other content "
            f"({existing.size_bytes} bytes, sha256 {existing.sha256})"
        )


def _register(engine: Engine, row: ModelArtifact, stored: Ingested) -> tuple[ModelArtifact, bool]:
    with Session(engine, expire_on_commit=False) as session:
        existing = _find(session, row.name, row.version, row.variant)
        if existing is None:
            session.add(row)
            try:
                session.commit()
                return row, True
            except IntegrityError:  # the same upload, racing
                session.rollback()
                existing = _find(session, row.name, row.version, row.variant)
                if existing is None:
                    raise
        _same_or_conflict(existing, stored.sha256, row.meta)
        return existing, False


@router.post("/models/{name}/versions/{version}", status_code=201)
async def upload_model(
    name: NameParam,
    version: VersionParam,
    request: Request,
    response: Response,
    state: StateDep,
    variant: Annotated[str, Query(pattern=VARIANT_PATTERN)] = DEFAULT_VARIANT,
    format: Annotated[ModelFormat | None, Query()] = None,
    filename: Annotated[str | None, Query(max_length=255)] = None,
    content_type: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
    x_edgefleet_metadata: Annotated[str | None, Header()] = None,
) -> ArtifactPublic:
    """Stream a model file into the registry: 201 when new, 200 when identical, 409 otherwise."""
    if (content_type or "").split(";")[0].strip().lower() != "application/octet-stream":
        raise InvalidInput("send the raw file with Content-Type: application/octet-stream")
    meta = _parse_metadata(x_edgefleet_metadata)
    await run_in_threadpool(_precheck, state.engine, name, version, variant, content_length)
    sniff = _FormatSniffer(format, filename)
    store = artifact_store(state.settings)
    try:
        stored = await store.ingest(request.stream(), on_first=sniff)
    except ClientDisconnect:
        raise InvalidInput("the upload was interrupted") from None
    if content_length is not None and stored.size != content_length:
        raise InvalidInput(f"received {stored.size} bytes, Content-Length said {content_length}")
    assert sniff.found is not None  # the sniffer saw the first bytes or refused them
    row = ModelArtifact(
        name=name,
        version=version,
        variant=variant,
        format=sniff.found.value,
        sha256=stored.sha256,
        size_bytes=stored.size,
        meta=meta.model_dump(mode="json"),
        created_at=state.clock(),
    )
    # A refused upload leaves its blob behind when it was new: a later sweep removes
    # blobs no row names (never here, where a racing upload may be about to name it).
    saved, created = await run_in_threadpool(_register, state.engine, row, stored)
    # Idempotent: an identical re-upload makes sure the target exists (a controller that
    # crashed between the row and the signature); start-up does the same for every row.
    await run_in_threadpool(state.tuf.add_target, artifact_target(saved), state.clock())
    if not created:
        response.status_code = 200
    return artifact_public(saved, state.settings.resolved_public_url)


def _rows(session: Session, name: str, version: str | None = None) -> list[ModelArtifact]:
    query = select(ModelArtifact).where(col(ModelArtifact.name) == name)
    if version is not None:
        query = query.where(col(ModelArtifact.version) == version)
    rows = list(session.exec(query.order_by(col(ModelArtifact.created_at))).all())
    if not rows:
        raise NotFound(f"no model {name!r}" + (f" version {version!r}" if version else ""))
    return rows


def _by_version(rows: list[ModelArtifact]) -> list[list[ModelArtifact]]:
    """Rows grouped by version, newest upload first."""
    groups: dict[str, list[ModelArtifact]] = {}
    for row in rows:
        groups.setdefault(row.version, []).append(row)
    return sorted(
        groups.values(),
        key=lambda g: max((utc(r.created_at), r.id or 0) for r in g),  # ties: upload order
        reverse=True,
    )


@router.get("/models")
def list_models(session: SessionDep) -> list[ModelSummary]:
    """Every model, by name, with its latest version that is not yanked."""
    rows = session.exec(select(ModelArtifact).order_by(col(ModelArtifact.name))).all()
    by_name: dict[str, list[ModelArtifact]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    result = []
    for name, named in by_name.items():
        versions = _by_version(named)
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
    return [_version_public(g, public_url) for g in _by_version(_rows(session, name))]


@router.get("/models/{name}/versions/{version}")
def show_version(
    name: NameParam, version: VersionParam, session: SessionDep, state: StateDep
) -> ModelVersionPublic:
    return _version_public(_rows(session, name, version), state.settings.resolved_public_url)


@router.post("/models/{name}/versions/{version}/yank")
def yank_version(
    name: NameParam, version: VersionParam, body: YankBody, session: SessionDep, state: StateDep
) -> ModelVersionPublic:
    """Withdraw a version (or one variant): no longer latest, still downloadable.

    Idempotent: variants already yanked keep their first time and reason.
    """
    rows = _rows(session, name, version)
    targets = [r for r in rows if body.variant is None or r.variant == body.variant]
    if not targets:
        raise NotFound(f"model {name!r} version {version!r} has no variant {body.variant!r}")
    now: datetime = state.clock()
    for row in targets:
        if row.yanked_at is None:
            row.yanked_at = now
            row.yank_reason = body.reason
            session.add(row)
    session.commit()
    return _version_public(rows, state.settings.resolved_public_url)


@router.put("/models/{name}/versions/{version}/card")
async def set_card(
    name: NameParam,
    version: VersionParam,
    request: Request,
    state: StateDep,
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
    return await run_in_threadpool(_set_card, state, name, version, variant, card)


def _set_card(
    state: FleetState, name: str, version: str, variant: str | None, card: str
) -> ModelVersionPublic:
    with Session(state.engine, expire_on_commit=False) as session:
        rows = _rows(session, name, version)
        targets = [r for r in rows if variant is None or r.variant == variant]
        if not targets:
            raise NotFound(f"model {name!r} version {version!r} has no variant {variant!r}")
        for row in targets:
            row.meta = {**row.meta, "card": card}  # a new dict, so the JSON change is seen
            session.add(row)
        session.commit()
        return _version_public(rows, state.settings.resolved_public_url)
