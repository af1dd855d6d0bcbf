"""An image's output folder: write its signed manifest; read it back and verify everything.

The folder holds the artifacts, ``sbom.cdx.json``, ``manifest.json`` and
``manifest.sig``. The builder writes the manifest with :func:`write_manifest` and signs it
with :func:`write_signature` (or leaves signing to ``edgefleet images sign`` on the
machine that holds the image key). :func:`verify_image` is what ``edgefleet images
verify`` runs, in this order, stopping at the first step that cannot go on:

1. the signature (nothing in the manifest is believed before it verifies);
2. every artifact's size and sha256;
3. every file in the tarball the manifest lists (``files_from``), or in a root
   filesystem given instead (an unpacked tarball, a mounted disk image), where the
   files a device writes at run time (:data:`RUNTIME_PATHS`) are not compared.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.errors import ImageRejected
from fleet.files import PUBLIC_FILE, atomic_write
from fleet.images.keys import keyid_of, sign_manifest
from fleet.images.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ImageManifest,
    Mismatch,
    check_entries,
    manifest_bytes,
    verify_manifest,
)
from fleet.images.scan import Progress, check_artifacts, entries_from_tar, entries_from_tree

__all__ = [
    "OVERLAY_SUFFIX",
    "RUNTIME_PATHS",
    "Meter",
    "Verified",
    "check_image",
    "image_folder",
    "read_verified",
    "verify_image",
    "write_manifest",
    "write_signature",
]

RUNTIME_PATHS: Final = (
    "var/lib/edgefleet",  # the agent's identity, models, TUF metadata, state
    "etc/edgefleet/provision.env",  # written by provisioning: the fleet URL and token
    "etc/edgefleet/root.json",  # the fleet's TUF root, stamped in by provisioning
    "etc/edgefleet/broker-ca.pem",  # the broker's CA, stamped in by provisioning
)
"""Paths (and everything under them) a device or provisioning writes after the build;
``edgefleet images verify --root`` does not compare them. They mirror where
``agent/provision.py`` and the agent write (the controller cannot import the agent)."""

OVERLAY_SUFFIX: Final = ".overlay.tar.gz"
"""An overlay lays its files over a vendor root filesystem (Jetson's L4T), so a root
checked against it has files the manifest never listed; only the listed ones are compared."""

Meter = Callable[[str, int | None], Progress]
"""Starts a progress display: (what is read, total bytes or None) -> report bytes read."""


def _no_meter(_label: str, _total: int | None) -> Progress:
    return lambda _n: None


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_image` found: the verified manifest and every mismatch."""

    manifest: ImageManifest
    keyid: str  # the image key that signed the manifest
    artifact_mismatches: tuple[Mismatch, ...]  # named by artifact
    file_mismatches: tuple[Mismatch, ...]  # named by path in the file system

    @property
    def ok(self) -> bool:
        return not self.artifact_mismatches and not self.file_mismatches


def image_folder(image: Path) -> Path:
    """The output folder ``image`` names: the folder itself, or the one its manifest is in."""
    return image.parent if image.name == MANIFEST_FILE and not image.is_dir() else image


def write_manifest(folder: Path, manifest: ImageManifest) -> bytes:
    """Write ``manifest.json`` (0644, atomically) into ``folder``; its bytes, for signing."""
    raw = manifest_bytes(manifest)
    atomic_write(folder / MANIFEST_FILE, raw, mode=PUBLIC_FILE)
    return raw


def write_signature(folder: Path, raw: bytes, private_pem: bytes) -> bytes:
    """Sign the manifest bytes ``raw`` with the image key; write ``manifest.sig`` (0644)."""
    signature = sign_manifest(raw, private_pem)
    atomic_write(folder / SIGNATURE_FILE, signature, mode=PUBLIC_FILE)
    return signature


def _read(folder: Path, name: str, missing: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError:
        raise ImageRejected(f"no {name} in {folder}: {missing}") from None
    except OSError as exc:
        raise ImageRejected(f"cannot read {folder / name}: {exc}") from None


def read_verified(folder: Path, public_pem: bytes) -> ImageManifest:
    """The manifest in ``folder``, verified against the image public key."""
    raw = _read(folder, MANIFEST_FILE, "not an image's output folder")
    signature = _read(
        folder, SIGNATURE_FILE, "the manifest is unsigned (`edgefleet images sign` signs it)"
    )
    return verify_manifest(raw, signature, public_pem)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_image(
    folder: Path,
    manifest: ImageManifest,
    *,
    root: Path | None = None,
    ignore: Collection[str] = (),
    meter: Meter | None = None,
) -> tuple[list[Mismatch], list[Mismatch]]:
    """(artifacts, files) that differ from ``manifest``: steps 2 and 3 of the verification.

    ``manifest`` is trusted as given: :func:`verify_image` verifies it first; ``edgefleet
    images sign`` runs this before it signs, so nobody signs what they have not checked.
    """
    start = meter or _no_meter
    total = sum(_size(folder / name) for name in manifest.artifacts)
    artifacts = check_artifacts(manifest, folder, start("artifacts", total))
    listed_only = False
    if root is not None:
        found = entries_from_tree(root, start(f"files under {root}", None))
        listed_only = manifest.files_from.endswith(OVERLAY_SUFFIX)
    elif any(m.path == manifest.files_from and m.kind == "missing" for m in artifacts):
        return artifacts, []  # the tarball is already named as missing
    else:
        tarball = folder / manifest.files_from
        try:
            found = entries_from_tar(tarball, start(f"files in {tarball.name}", _size(tarball)))
        except ImageRejected as exc:
            return artifacts, [Mismatch(manifest.files_from, "changed", str(exc))]
    return artifacts, check_entries(manifest, found, ignore=ignore, listed_only=listed_only)


def verify_image(
    folder: Path,
    public_pem: bytes,
    *,
    root: Path | None = None,
    ignore: Collection[str] = (),
    meter: Meter | None = None,
) -> Verified:
    """Check the image in ``folder``: its signature, its artifacts, its files.

    Given ``root`` (a mounted or unpacked root filesystem), its files are compared
    instead of the tarball's, except those under ``ignore``. A bad signature raises
    :class:`ImageRejected` before anything else is read; every artifact and file that
    differs is returned, named, in the result.
    """
    manifest = read_verified(folder, public_pem)
    keyid = keyid_of(public_pem)  # the signer's, now that the signature verified
    artifacts, files = check_image(folder, manifest, root=root, ignore=ignore, meter=meter)
    return Verified(manifest, keyid, tuple(artifacts), tuple(files))
