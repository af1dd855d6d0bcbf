"""Small firmware images made in a test's tmp_path: a tarball, the artifacts, a signed manifest.

No real image build: :func:`make_tar` writes a gzip tarball of a handful of members (the
kinds a Debian root filesystem has), and :func:`make_image` lays out an output folder the
way the builder does, with the manifest made by the same functions the builder calls.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from fleet.images.folder import write_manifest, write_signature
from fleet.images.inventory import DebianPackage, PythonPackage
from fleet.images.keys import generate_image_key
from fleet.images.manifest import SBOM_FILE, ImageManifest, Packages
from fleet.images.scan import artifact_of, entries_from_tar

__all__ = [
    "EPOCH",
    "RECIPE",
    "Keys",
    "Member",
    "default_members",
    "make_image",
    "make_tar",
    "tree_to_tar",
]

RECIPE = "x86-test"
EPOCH = 1_700_000_000  # SOURCE_DATE_EPOCH of the test images


@dataclass(frozen=True)
class Member:
    """One tarball member: ``kind`` is file, dir, symlink, hardlink, chardev or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Keys:
    private: bytes
    public: bytes

    @classmethod
    def new(cls) -> Keys:
        return cls(*generate_image_key())


def default_members() -> list[Member]:
    return [
        Member("./", "dir", mode=0o755),
        Member("./bin", "symlink", target="usr/bin", mode=0o777),
        Member("./dev", "dir", mode=0o755),
        Member("./dev/null", "chardev", target="1:3", mode=0o666),
        Member("./etc", "dir", mode=0o755),
        Member("./etc/edgefleet", "dir", mode=0o755),
        Member("./etc/hostname", data=b"edge\n"),
        Member("./etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Member("./etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42),
        Member("./run", "dir", mode=0o755),
        Member("./run/initctl", "fifo", mode=0o600),
        Member("./usr", "dir", mode=0o755),
        Member("./usr/bin", "dir", mode=0o755),
        Member("./usr/bin/agent", data=b"#!/bin/sh\necho agent\n", mode=0o755),
        Member("./usr/bin/agent-again", "hardlink", target="./usr/bin/agent"),
        Member("./usr/bin/su", data=b"\x7fELF su", mode=0o4755),
    ]


def make_tar(path: Path, members: list[Member]) -> Path:
    """A gzip tarball of ``members``, normalised like the builder's (fixed times, gzip -n)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.uid, info.gid, info.mtime = m.mode, m.uid, m.gid, EPOCH
            data = None
            if m.kind == "file":
                info.size, data = len(m.data), io.BytesIO(m.data)
            elif m.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m.target
            elif m.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m.target
            elif m.kind == "chardev":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = (int(x) for x in m.target.split(":"))
            elif m.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                raise ValueError(m.kind)
            tar.addfile(info, data)
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return path


def tree_to_tar(root: Path, path: Path) -> Path:
    """A gzip tarball of the directory ``root``, owners and modes as they are on disk."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for current, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted([*dirs, *files]):
                full = Path(current) / name
                tar.add(full, arcname=str(full.relative_to(root)), recursive=False)
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return path


def make_image(
    folder: Path,
    keys: Keys | None,
    members: list[Member] | None = None,
    *,
    tarball: Path | None = None,
    version: str = "2025.6.1",
) -> ImageManifest:
    """An output folder with a rootfs tarball, a raw image, an SBOM and a manifest.

    Signed with ``keys`` (unsigned when None). ``tarball``, when given, is used as is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rootfs = folder / f"{RECIPE}.rootfs.tar.gz"
    if tarball is not None:
        rootfs.write_bytes(tarball.read_bytes())
    else:
        make_tar(rootfs, default_members() if members is None else members)
    (folder / f"{RECIPE}.img").write_bytes(b"\x00" * 4096 + b"raw disk image" + b"\x00" * 512)
    (folder / SBOM_FILE).write_text('{"bomFormat": "CycloneDX", "specVersion": "1.6"}\n')
    manifest = ImageManifest(
        recipe=RECIPE,
        version=version,
        arch="amd64",
        device_class="x86",
        source_date_epoch=EPOCH,
        built_with="0.1.0",
        artifacts={
            name: artifact_of(folder / name) for name in (rootfs.name, f"{RECIPE}.img", SBOM_FILE)
        },
        files_from=rootfs.name,
        packages=Packages(
            debian=(
                DebianPackage(name="bash", version="5.2.15-2+b7", arch="amd64"),
                DebianPackage(name="libc6", version="2.36-9+deb12u10", arch="amd64"),
            ),
            python=(PythonPackage(name="pydantic", version="2.14.3"),),
        ),
        files=entries_from_tar(rootfs),
    )
    raw = write_manifest(folder, manifest)
    if keys is not None:
        write_signature(folder, raw, keys.private)
    return manifest
