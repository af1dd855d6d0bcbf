"""The signed manifest of a firmware image: what was built, and every file inside it.

The manifest names the recipe, version and architecture, the sha256 and size of each
artifact in the image's output folder (the root filesystem or overlay tarball, the raw
disk image, the SBOM), the packages installed, and for every file in the tarball its
type, permission bits, owner, size, hash and link target. Its bytes
(:func:`manifest_bytes`) are deterministic: the same build gives the same bytes, so two
builders can compare manifests with ``cmp``, and the image key signs exactly those bytes.

Everything here is pure. :func:`verify_manifest` takes bytes and a public key and gives
a verified :class:`ImageManifest` or an :class:`~fleet.errors.ImageRejected` saying why
not; :func:`check_entries` compares the manifest with the files actually found (by
:mod:`fleet.images.scan`) and names every difference. Nothing in a manifest is believed
before its signature verifies.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.errors import ImageRejected
from fleet.images.inventory import DebianPackage, PythonPackage
from fleet.images.keys import check_signature

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "SBOM_FILE",
    "SIGNATURE_FILE",
    "Artifact",
    "EntryType",
    "FileEntry",
    "ImageManifest",
    "Mismatch",
    "Packages",
    "check_artifact_digests",
    "check_entries",
    "check_path",
    "is_ignored",
    "manifest_bytes",
    "parse_manifest",
    "verify_manifest",
]

MANIFEST_FORMAT: Final = "edgefleet-image-manifest/1"
MANIFEST_FILE: Final = "manifest.json"
SIGNATURE_FILE: Final = "manifest.sig"
SBOM_FILE: Final = "sbom.cdx.json"

EntryType = Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo", "socket"]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")]
Text = Annotated[str, StringConstraints(pattern=r"^\S{1,128}$")]
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
_MAX_PATH = 4096


def check_path(path: str) -> str:
    """``path`` if it is relative, POSIX, normalised and UTF-8: ``etc/passwd``, never ``./x``."""
    if not path or len(path) > _MAX_PATH:
        raise ValueError(f"a path of {len(path)} characters")
    if path.startswith("/") or "\x00" in path:
        raise ValueError(f"{path!r} is absolute or holds a NUL")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"{path!r} is not normalised (empty, '.' or '..' component)")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path!r} is not UTF-8") from None
    return path


class FileEntry(BaseModel):
    """One member of an image's file system, as the manifest records it.

    ``size`` and ``sha256`` describe a regular file's contents (0 and None for anything
    else); ``target`` is a symlink's target as written, or the path a hard link shares
    its contents with; ``device`` is a device node's ``major:minor``. Timestamps are left
    out: the build clamps them to ``source_date_epoch``, and a mounted root changes them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    type: EntryType
    mode: int = Field(ge=0, le=0o7777)  # permission bits with setuid, setgid, sticky
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)
    size: int = Field(default=0, ge=0)  # bytes
    sha256: Sha256Hex | None = None
    target: str | None = Field(default=None, min_length=1, max_length=_MAX_PATH)
    device: str | None = Field(default=None, pattern=r"^[0-9]{1,10}:[0-9]{1,10}$")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)

    @model_validator(mode="after")
    def _fields_match_type(self) -> FileEntry:
        is_file = self.type == "file"
        if is_file != (self.sha256 is not None) or (not is_file and self.size):
            raise ValueError(f"{self.path}: only a regular file has a size and a sha256")
        if (self.type in ("symlink", "hardlink")) != (self.target is not None):
            raise ValueError(f"{self.path}: only a link has a target, and a link has one")
        if self.type == "hardlink" and self.target is not None:
            check_path(self.target)
        if (self.type in ("chardev", "blockdev")) != (self.device is not None):
            raise ValueError(f"{self.path}: only a device node has a device number")
        return self


class Artifact(BaseModel):
    """One file of the image's output folder: its size in bytes and sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: Sha256Hex
    size: int = Field(ge=0)


class Packages(BaseModel):
    """What the image has installed, each list sorted as :mod:`fleet.images.inventory` reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    debian: tuple[DebianPackage, ...] = ()
    python: tuple[PythonPackage, ...] = ()


class ImageManifest(BaseModel):
    """A built image: what it is, its artifacts, its packages, and every file in ``files_from``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["edgefleet-image-manifest/1"] = MANIFEST_FORMAT
    recipe: Name
    version: Text
    arch: Name  # Debian's name for it: amd64, arm64
    device_class: Name
    source_date_epoch: int = Field(ge=0)  # seconds; every timestamp in the image is clamped to it
    built_with: Text  # the edgefleet version that built it
    artifacts: dict[str, Artifact]  # file name in the output folder -> its digest
    files_from: str  # the artifact (a tarball) whose members ``files`` lists
    packages: Packages = Packages()
    files: tuple[FileEntry, ...]  # sorted by path, each path once

    @field_validator("artifacts")
    @classmethod
    def _artifact_names(cls, value: dict[str, Artifact]) -> dict[str, Artifact]:
        for name in value:
            if not _ARTIFACT_NAME.fullmatch(name) or name in (MANIFEST_FILE, SIGNATURE_FILE):
                raise ValueError(f"{name!r} is not a plain file name of the output folder")
        return value

    @field_validator("files")
    @classmethod
    def _sorted_once(cls, value: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        for before, after in itertools.pairwise(value):
            if before.path >= after.path:
                raise ValueError(
                    f"files must be sorted by path, each once: {after.path!r} after {before.path!r}"
                )
        return value

    @model_validator(mode="after")
    def _files_from_an_artifact(self) -> ImageManifest:
        if self.files_from not in self.artifacts:
            raise ValueError(f"files_from {self.files_from!r} is not one of the artifacts")
        return self


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def manifest_bytes(manifest: ImageManifest) -> bytes:
    """The manifest as signed and written: sorted keys, one file entry a line, ASCII only.

    Deterministic (the same manifest always gives the same bytes) and still readable
    with ``less`` or ``diff``; any JSON parser reads it.
    """
    data = manifest.model_dump(mode="json", exclude_none=True)
    lines = []
    for key in sorted(data):
        if key == "files" and data[key]:
            value = "[\n" + ",\n".join(_compact(entry) for entry in data[key]) + "\n]"
        else:
            value = _compact(data[key])
        lines.append(f"{_compact(key)}:{value}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("ascii")


def parse_manifest(raw: bytes) -> ImageManifest:
    """The manifest in ``raw``, or why it is not one (unverified: check the signature first)."""
    try:
        return ImageManifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ImageRejected(
            f"the manifest is malformed ({exc.error_count()} errors), {where}: {first['msg']}"
        ) from None


def verify_manifest(raw: bytes, signature_file: bytes, public_pem: bytes) -> ImageManifest:
    """The manifest in ``raw`` once its signature by the image key verifies.

    The signature is checked before anything in the manifest is read; then the manifest
    must parse. Each failure is an :class:`ImageRejected` that says which.
    """
    check_signature(raw, signature_file, public_pem)
    return parse_manifest(raw)


@dataclass(frozen=True)
class Mismatch:
    """One way the image found differs from its manifest, named by path."""

    path: str
    kind: Literal["changed", "missing", "unexpected"]
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind:<10} {self.path}" + (f": {self.detail}" if self.detail else "")


def is_ignored(path: str, ignore: Collection[str]) -> bool:
    """Whether ``path`` is one of ``ignore`` or lies under one of them."""
    return any(path == prefix or path.startswith(f"{prefix}/") for prefix in ignore)


def _with_links_resolved(entries: Iterable[FileEntry]) -> dict[str, FileEntry]:
    """Entries by path, each hard link shown as the file it shares contents with.

    A tarball records a hard link as a link to an earlier member; a directory walk sees
    two regular files. Resolving both sides the same way compares them fairly.
    """
    by_path = {entry.path: entry for entry in entries}
    for path, entry in by_path.items():
        if entry.type != "hardlink" or entry.target is None:
            continue
        shared = by_path.get(entry.target)
        if shared is not None and shared.type == "file":
            contents = {"size": shared.size, "sha256": shared.sha256}
            by_path[path] = entry.model_copy(update={"type": "file", "target": None, **contents})
    return by_path


def _short(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"{value[:12]}…"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def _differences(expected: FileEntry, found: FileEntry) -> list[str]:
    if expected.type != found.type:
        return [f"type {expected.type} -> {found.type}"]
    fields = ["size", "sha256", "uid", "gid", "target", "device"]
    if expected.type != "symlink":  # Linux ignores a symlink's mode bits
        fields.insert(2, "mode")
    changes = []
    for field in fields:
        before, after = getattr(expected, field), getattr(found, field)
        if before != after:
            if field == "mode":
                changes.append(f"mode {before:04o} -> {after:04o}")
            else:
                changes.append(f"{field} {_short(before)} -> {_short(after)}")
    return changes


def check_entries(
    manifest: ImageManifest,
    found: Sequence[FileEntry],
    *,
    ignore: Collection[str] = (),
    listed_only: bool = False,
) -> list[Mismatch]:
    """Every file that differs from the manifest, is missing, or is not in it; by path.

    Paths in ``ignore`` (and everything under them) are not compared: what a device
    writes at run time, when checking a root filesystem that has been used. With
    ``listed_only``, files the manifest does not list are not reported: an overlay
    checked on the vendor root filesystem it was laid over.
    """
    expected = _with_links_resolved(manifest.files)
    actual = _with_links_resolved(found)
    mismatches = []
    for path in sorted(expected.keys() | actual.keys()):
        if is_ignored(path, ignore):
            continue
        want, got = expected.get(path), actual.get(path)
        if got is None:
            mismatches.append(Mismatch(path, "missing", "in the manifest, not in the image"))
        elif want is None:
            if not listed_only:
                detail = f"a {got.type} the manifest does not list"
                mismatches.append(Mismatch(path, "unexpected", detail))
        elif changes := _differences(want, got):
            mismatches.append(Mismatch(path, "changed", "; ".join(changes)))
    return mismatches


def check_artifact_digests(
    manifest: ImageManifest, found: Mapping[str, Artifact | None]
) -> list[Mismatch]:
    """Every artifact whose digest (None: absent) differs from the manifest's; by name."""
    mismatches = []
    for name, want in sorted(manifest.artifacts.items()):
        got = found.get(name)
        if got is None:
            mismatches.append(Mismatch(name, "missing", "an artifact of the manifest is absent"))
        elif got != want:
            changes = [
                f"{field} {_short(getattr(want, field))} -> {_short(getattr(got, field))}"
                for field in ("size", "sha256")
                if getattr(want, field) != getattr(got, field)
            ]
            mismatches.append(Mismatch(name, "changed", "; ".join(changes)))
    return mismatches
