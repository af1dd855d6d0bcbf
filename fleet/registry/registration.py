"""Registering model artifacts: a file into the store, a row in the database, a TUF target.

An upload streams into the content-addressed store (:mod:`fleet.registry.store`) while
it is hashed, so a multi-GB file never sits in memory; its first bytes must be what
the declared format says (:class:`FormatSniffer`). One row per (name, version,
variant): the same bytes and metadata again are a no-op, anything else a
:class:`~fleet.errors.Conflict`. Every registered artifact is a TUF target
(:func:`artifact_target`): signed at once when the targets keys are online, staged for
offline signing otherwise; start-up adds the rows that are not targets yet
(:func:`add_missing_targets`). Yanking withdraws a version (or one variant) without
deleting it: a rollback may need it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet.config import FleetSettings
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.registry.backends import blobs_for
from fleet.registry.repository import TargetsChange, TufRepository
from fleet.registry.store import ArtifactStore
from fleet.registry.targets import TargetDescription, describe_target
from fleet.registry.variants import VariantRequirements
from fleet.tables import ModelArtifact, as_utc
from models.manifest import ModelFormat

__all__ = [
    "GGUF_MAGIC",
    "FormatSniffer",
    "Upload",
    "add_missing_targets",
    "artifact_store",
    "artifact_target",
    "by_version",
    "register_upload",
    "rows_of",
    "set_card",
    "yank",
]

GGUF_MAGIC = b"GGUF"


def artifact_store(settings: FleetSettings) -> ArtifactStore:
    """The store the settings name; ``ConfigError`` if they name a bucket badly."""
    return ArtifactStore(
        settings.resolved_artifact_dir,
        max_bytes=settings.artifact_max_bytes,
        blobs=blobs_for(settings),
    )


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


def add_missing_targets(engine: Engine, repo: TufRepository, now: datetime) -> TargetsChange | None:
    """Sign (or stage) every registered artifact that is not a TUF target yet; None: none."""
    with Session(engine) as session:
        rows = session.exec(select(ModelArtifact)).all()
    missing = [t for t in map(artifact_target, rows) if not repo.has_target(t.path)]
    return repo.add_targets(missing, now) if missing else None


class FormatSniffer:
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


@dataclass(frozen=True)
class Upload:
    """What an uploader says about the file it sends."""

    name: str
    version: str
    variant: str
    format: ModelFormat | None  # None: tell from the first bytes (or the file name)
    filename: str | None
    length: int | None  # bytes, as declared (Content-Length); None: not declared
    meta: dict[str, Any]  # ModelMetadata as JSON


def _find(session: Session, name: str, version: str, variant: str) -> ModelArtifact | None:
    return session.exec(
        select(ModelArtifact).where(
            col(ModelArtifact.name) == name,
            col(ModelArtifact.version) == version,
            col(ModelArtifact.variant) == variant,
        )
    ).first()


_UNSTATED: tuple[Any, ...] = (None, {}, [], VariantRequirements().model_dump(mode="json"))


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata as stated: a field at its default (one added after an upload) is left out."""
    return {k: v for k, v in meta.items() if k != "card" and v not in _UNSTATED}


def _same_or_conflict(existing: ModelArtifact, sha256: str, meta: dict[str, Any]) -> None:
    where = f"{existing.name} {existing.version} ({existing.variant})"
    if existing.sha256 != sha256:
        raise Conflict(
            f"{where} is already registered with other content (sha256 {existing.sha256}): "
            "upload it as a new version"
        )
    if _comparable(existing.meta) != _comparable(meta):
        raise Conflict(f"{where} is already registered with other metadata: use a new version")


def _precheck(engine: Engine, upload: Upload) -> None:
    """Refuse before reading the body when the declared length already tells it differs."""
    if upload.length is None:
        return
    with Session(engine) as session:
        existing = _find(session, upload.name, upload.version, upload.variant)
    if existing is not None and existing.size_bytes != upload.length:
        raise Conflict(
            f"{upload.name} {upload.version} ({upload.variant}) is already registered with "
            f"other content ({existing.size_bytes} bytes, sha256 {existing.sha256})"
        )


def _register(engine: Engine, row: ModelArtifact) -> tuple[ModelArtifact, bool]:
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
        _same_or_conflict(existing, row.sha256, row.meta)
        return existing, False


async def register_upload(
    engine: Engine,
    store: ArtifactStore,
    tuf: TufRepository,
    upload: Upload,
    body: AsyncIterable[bytes],
    now: datetime,
) -> tuple[ModelArtifact, bool]:
    """Store ``body``, register it and make it a TUF target; ``(row, created)``.

    ``created`` is False for an identical re-upload. Any exception ``body`` raises (a
    client that went away) propagates, with the partial file removed.
    """
    await run_in_threadpool(_precheck, engine, upload)
    sniff = FormatSniffer(upload.format, upload.filename)
    stored = await store.ingest(body, on_first=sniff)
    if upload.length is not None and stored.size != upload.length:
        raise InvalidInput(f"received {stored.size} bytes, Content-Length said {upload.length}")
    assert sniff.found is not None  # the sniffer saw the first bytes or refused them
    row = ModelArtifact(
        name=upload.name,
        version=upload.version,
        variant=upload.variant,
        format=sniff.found.value,
        sha256=stored.sha256,
        size_bytes=stored.size,
        meta=upload.meta,
        created_at=now,
    )
    # A refused upload leaves its blob behind when it was new: a later sweep removes
    # blobs no row names (never here, where a racing upload may be about to name it).
    saved, created = await run_in_threadpool(_register, engine, row)
    # Idempotent: an identical re-upload makes sure the target exists (a controller that
    # crashed between the row and the signature); start-up does the same for every row.
    await run_in_threadpool(tuf.add_target, artifact_target(saved), now)
    return saved, created


def rows_of(session: Session, name: str, version: str | None = None) -> list[ModelArtifact]:
    """A model's artifacts (one version's, if given), oldest first; ``NotFound`` if none."""
    query = select(ModelArtifact).where(col(ModelArtifact.name) == name)
    if version is not None:
        query = query.where(col(ModelArtifact.version) == version)
    rows = list(session.exec(query.order_by(col(ModelArtifact.created_at))).all())
    if not rows:
        raise NotFound(f"no model {name!r}" + (f" version {version!r}" if version else ""))
    return rows


def _uploaded(row: ModelArtifact) -> datetime:
    created = as_utc(row.created_at)
    assert created is not None
    return created


def by_version(rows: list[ModelArtifact]) -> list[list[ModelArtifact]]:
    """Rows grouped by version, newest upload first."""
    groups: dict[str, list[ModelArtifact]] = {}
    for row in rows:
        groups.setdefault(row.version, []).append(row)
    return sorted(
        groups.values(),
        key=lambda g: max((_uploaded(r), r.id or 0) for r in g),  # ties: upload order
        reverse=True,
    )


def _variants(
    rows: list[ModelArtifact], name: str, version: str, variant: str | None
) -> list[ModelArtifact]:
    chosen = [r for r in rows if variant is None or r.variant == variant]
    if not chosen:
        raise NotFound(f"model {name!r} version {version!r} has no variant {variant!r}")
    return chosen


def yank(
    session: Session, name: str, version: str, variant: str | None, reason: str, now: datetime
) -> list[ModelArtifact]:
    """Withdraw a version (or one variant): no longer latest, still downloadable.

    Idempotent: variants already yanked keep their first time and reason. Returns every
    row of the version.
    """
    rows = rows_of(session, name, version)
    for row in _variants(rows, name, version, variant):
        if row.yanked_at is None:
            row.yanked_at = now
            row.yank_reason = reason
            session.add(row)
    session.commit()
    return rows


def set_card(
    engine: Engine, name: str, version: str, variant: str | None, card: str
) -> list[ModelArtifact]:
    """Replace the model card of a version's variants (or one); every row of the version."""
    with Session(engine, expire_on_commit=False) as session:
        rows = rows_of(session, name, version)
        for row in _variants(rows, name, version, variant):
            row.meta = {**row.meta, "card": card}  # a new dict, so the JSON change is seen
            session.add(row)
        session.commit()
        return rows
