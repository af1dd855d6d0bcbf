"""Read what an image actually holds: the members of its tarball, a root tree, artifact digests.

The I/O half of :mod:`fleet.images.manifest`: these functions turn files into
:class:`~fleet.images.manifest.FileEntry` and :class:`~fleet.images.manifest.Artifact`
values, and the pure checks there compare them with the manifest. The builder makes the
manifest's file list with :func:`entries_from_tar` on the tarball it ships, and
``edgefleet images verify`` reads the same way, so the two sides see the same thing.
Large files are streamed; ``progress`` (when given) is called with each count of bytes
read, for a progress bar.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from pydantic import ValidationError

from fleet.errors import ConfigError, ImageRejected
from fleet.images.manifest import Artifact, EntryType, FileEntry, ImageManifest, Mismatch
from fleet.images.manifest import check_artifact_digests as _check_digests

__all__ = [
    "Progress",
    "artifact_of",
    "check_artifacts",
    "entries_from_tar",
    "entries_from_tree",
]

Progress = Callable[[int], None]  # called with the number of bytes just read

_CHUNK: Final = 1024 * 1024  # bytes read at a time
_TAR_TYPES: Final[dict[bytes, EntryType]] = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "chardev",
    tarfile.BLKTYPE: "blockdev",
    tarfile.FIFOTYPE: "fifo",
}


def _ignore(_: int) -> None:
    return None


def _hash(stream: IO[bytes], progress: Progress) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of what ``stream`` holds, read in chunks."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        progress(len(chunk))
    return digest.hexdigest(), size


class _Counting:
    """A binary file that reports each read to ``progress``: a tarball's compressed bytes."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self._raw, self._progress = raw, progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._progress(len(data))
        return data


def _member_path(name: str) -> str:
    """A member name as a manifest path: ``./etc/`` -> ``etc``; ``.`` -> ``""`` (the root)."""
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name.rstrip("/")


def _entry(member: tarfile.TarFile | None, info: tarfile.TarInfo, path: str) -> FileEntry:
    kind = _TAR_TYPES.get(info.type)
    if kind is None:
        raise ImageRejected(f"tarball member {path!r} is of an unsupported type {info.type!r}")
    fields: dict[str, object] = {
        "path": path,
        "type": kind,
        "mode": stat.S_IMODE(info.mode),
        "uid": info.uid,
        "gid": info.gid,
    }
    if kind == "file":
        assert member is not None
        stream = member.extractfile(info)
        if stream is None:
            raise ImageRejected(f"tarball member {path!r} has no contents to read")
        with stream:
            fields["sha256"], fields["size"] = _hash(stream, _ignore)
    elif kind == "symlink":
        fields["target"] = info.linkname
    elif kind == "hardlink":
        fields["target"] = _member_path(info.linkname)
    elif kind in ("chardev", "blockdev"):
        fields["device"] = f"{info.devmajor}:{info.devminor}"
    try:
        return FileEntry.model_validate(fields)
    except ValidationError as exc:
        raise ImageRejected(f"tarball member {path!r} is unsafe or malformed: {exc}") from None


def entries_from_tar(path: Path, progress: Progress | None = None) -> list[FileEntry]:
    """Every member of the tarball at ``path`` (plain or compressed), sorted by path.

    Streamed: each file is hashed as it passes, nothing is extracted. The root (``.``)
    is left out. A member with an absolute or ``..`` path, an unsupported type, or listed
    twice (the later one would win on extraction) rejects the tarball.
    """
    entries: dict[str, FileEntry] = {}
    try:
        with (
            path.open("rb") as raw,
            tarfile.open(fileobj=_Counting(raw, progress or _ignore), mode="r|*") as tar,  # type: ignore[call-overload]
        ):
            for info in tar:
                name = _member_path(info.name)
                if not name:
                    continue
                if name in entries:
                    raise ImageRejected(f"the tarball lists {name!r} twice")
                entries[name] = _entry(tar, info, name)
    except FileNotFoundError:
        raise ImageRejected(f"no tarball at {path}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageRejected(f"{path} is not a readable tarball: {exc}") from None
    return [entries[name] for name in sorted(entries)]


def _tree_type(mode: int) -> EntryType:
    kinds: list[tuple[Callable[[int], bool], EntryType]] = [
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ]
    return next(kind for test, kind in kinds if test(mode))


def _tree_entry(full: Path, path: str, st: os.stat_result, progress: Progress) -> FileEntry:
    kind = _tree_type(st.st_mode)
    fields: dict[str, object] = {
        "path": path,
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if kind == "file":
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except PermissionError:
            raise ConfigError(f"cannot read {full}: verify a root filesystem as root") from None
        with os.fdopen(fd, "rb") as stream:
            fields["sha256"], fields["size"] = _hash(stream, progress)
    elif kind == "symlink":
        fields["target"] = str(full.readlink())
    elif kind in ("chardev", "blockdev"):
        fields["device"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        return FileEntry.model_validate(fields)
    except ValidationError as exc:
        raise ImageRejected(f"{full} cannot be described: {exc}") from None


def entries_from_tree(root: Path, progress: Progress | None = None) -> list[FileEntry]:
    """Every file under ``root`` (an unpacked or mounted root filesystem), sorted by path.

    Symlinks are recorded, never followed, and the walk stays on ``root``'s file system:
    a mount point inside it (``proc``, ``sys`` on a live system) is listed, its contents
    are not. Hard links appear as regular files; the comparison allows for that.
    """
    report = progress or _ignore
    try:
        device = root.lstat().st_dev
    except OSError as exc:
        raise ConfigError(f"cannot read the root filesystem {root}: {exc}") from None
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    entries: list[FileEntry] = []
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            children = sorted(os.scandir(folder), key=lambda child: child.name)
        except PermissionError:
            raise ConfigError(f"cannot list {folder}: verify a root filesystem as root") from None
        for child in children:
            path = f"{prefix}{child.name}"
            st = child.stat(follow_symlinks=False)
            entries.append(_tree_entry(Path(child.path), path, st, report))
            if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                pending.append((Path(child.path), f"{path}/"))
    return sorted(entries, key=lambda entry: entry.path)


def artifact_of(path: Path, progress: Progress | None = None) -> Artifact:
    """The size and sha256 of the file at ``path``, streamed."""
    with path.open("rb") as stream:
        sha256, size = _hash(stream, progress or _ignore)
    return Artifact(sha256=sha256, size=size)


def check_artifacts(
    manifest: ImageManifest, folder: Path, progress: Progress | None = None
) -> list[Mismatch]:
    """Every artifact of ``manifest`` that is absent from ``folder`` or differs; by name.

    Only the artifacts the manifest names are read (their names are plain file names,
    checked when the manifest was parsed); other files in the folder are not looked at.
    """
    found: dict[str, Artifact | None] = {}
    for name in manifest.artifacts:
        candidate = folder / name
        found[name] = artifact_of(candidate, progress) if candidate.is_file() else None
    return _check_digests(manifest, found)
