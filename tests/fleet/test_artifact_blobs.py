"""The blob seam's contract, held by both backends: the folder and S3 (on its fake client)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.errors import StorageUnavailable
from fleet.registry.blobs import Blobs
from fleet.registry.folder import FolderBlobs
from fleet.registry.s3 import S3Blobs, S3Layout
from tests.fakes.s3 import FakeS3
from tests.fleet.test_registry import GGUF, sha

Overwrite = Callable[[str, bytes], None]  # what another writer does to an address


def _folder(tmp_path: Path) -> tuple[Blobs, Overwrite]:
    blobs = FolderBlobs(tmp_path / "store")

    def overwrite(digest: str, data: bytes) -> None:
        other = tmp_path / "other"
        other.write_bytes(data)
        other.replace(blobs.path(digest))

    return blobs, overwrite


def _s3(tmp_path: Path) -> tuple[Blobs, Overwrite]:
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3 = FakeS3.with_bucket(bucket)
    layout = S3Layout(bucket, "p")
    return S3Blobs(s3, layout), lambda digest, data: s3.write(bucket, layout.key(digest), data)


@pytest.fixture(params=[_folder, _s3], ids=["folder", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Blobs, Overwrite]:
    make: Callable[[Path], tuple[Blobs, Overwrite]] = request.param
    return make(tmp_path)


def staged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"staged-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return path


def test_put_stat_digest_chunks_and_list(backend: tuple[Blobs, Overwrite], tmp_path: Path) -> None:
    blobs, _ = backend
    digest = sha(GGUF)
    assert blobs.stat(digest) is None
    source = staged(tmp_path, GGUF)
    stat = blobs.put(digest, source)
    assert not source.exists()  # consumed
    assert blobs.stat(digest) == stat
    assert stat.size == len(GGUF)
    assert blobs.digest(digest, stat) == digest
    assert b"".join(blobs.chunks(digest, stat, 0, stat.size)) == GGUF
    assert b"".join(blobs.chunks(digest, stat, 10, 20)) == GGUF[10:20]
    other = sha(b"other")
    blobs.put(other, staged(tmp_path, b"other"))
    assert list(blobs.addresses()) == sorted([digest, other])


def test_a_write_moves_the_version_and_old_reads_are_refused(
    backend: tuple[Blobs, Overwrite], tmp_path: Path
) -> None:
    blobs, overwrite = backend
    digest = sha(GGUF)
    before = blobs.put(digest, staged(tmp_path, GGUF))
    overwrite(digest, GGUF)  # the same bytes, written again: checked again all the same
    again = blobs.stat(digest)
    assert again is not None
    assert again.version != before.version
    overwrite(digest, b"GGUF, other bytes")
    with pytest.raises(StorageUnavailable, match="changed since it was checked"):
        b"".join(blobs.chunks(digest, again, 0, 10))


def test_quarantine_moves_a_blob_out_of_the_listing(
    backend: tuple[Blobs, Overwrite], tmp_path: Path
) -> None:
    blobs, _ = backend
    digest = sha(GGUF)
    stat = blobs.put(digest, staged(tmp_path, GGUF))
    where = blobs.quarantine(digest, stat)
    assert "quarantine" in where
    assert blobs.stat(digest) is None
    assert list(blobs.addresses()) == []
