"""The artifact store on the S3 backend, against a fake of its S3 client (no network).

The same promises as the folder backend's (tests/fleet/test_artifact_integrity.py):
content addressed, hashed before serving once per change of the object, a corrupt
object quarantined and never served, a push restoring it; plus what is S3's own: the
key layout, If-Match on every read, paginated listings, errors translated.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.config import FleetSettings
from fleet.errors import ArtifactCorrupt, ConfigError, NotFound, StorageUnavailable
from fleet.registry.backends import blobs_for
from fleet.registry.folder import FolderBlobs
from fleet.registry.s3 import S3Blobs, S3Layout
from fleet.registry.store import ArtifactStore
from tests.fakes.s3 import FakeS3
from tests.fleet.test_registry import GGUF, sha

PREFIX = "fleet/artifacts"


@pytest.fixture
def bucket() -> str:
    """A bucket name no other test uses: the store's memory of checks is per process."""
    return f"models-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3(bucket: str) -> FakeS3:
    return FakeS3.with_bucket(bucket)


@pytest.fixture
def store(tmp_path: Path, s3: FakeS3, bucket: str) -> ArtifactStore:
    return ArtifactStore(tmp_path / "staging", blobs=S3Blobs(s3, S3Layout(bucket, PREFIX)))


def key(data: bytes) -> str:
    return f"{PREFIX}/{sha(data)[:2]}/{sha(data)}"


def gets(s3: FakeS3) -> int:
    return sum(1 for operation, _ in s3.calls if operation == "GetObject")


def read(store: ArtifactStore, digest: str, start: int = 0, end: int | None = None) -> bytes:
    blob = store.verified(digest)
    return b"".join(store.chunks(digest, blob, start, blob.size if end is None else end))


# --- the layout ------------------------------------------------------------------------------


def test_keys_are_prefix_first_two_hex_digits_and_the_digest() -> None:
    digest = sha(GGUF)
    assert S3Layout("b", "fleet/artifacts").key(digest) == f"fleet/artifacts/{digest[:2]}/{digest}"
    assert S3Layout("b").key(digest) == f"{digest[:2]}/{digest}"
    layout = S3Layout("b", "p")
    assert layout.address_of(f"p/{digest[:2]}/{digest}") == digest
    for other in [
        f"p/quarantine/{digest}-1",
        f"p/{digest[2:4]}/{digest}",  # not under its own two digits
        f"q/{digest[:2]}/{digest}",
        f"p/{digest[:2]}/{digest}.tmp",
        f"{digest[:2]}/{digest}",
    ]:
        assert layout.address_of(other) is None, other
    assert S3Layout("b").address_of(f"{digest[:2]}/{digest}") == digest
    with pytest.raises(ConfigError):
        S3Layout("b", "/p/")
    with pytest.raises(ConfigError):
        S3Layout("")


# --- ingest ----------------------------------------------------------------------------------


def test_ingest_hashes_locally_then_uploads_under_the_digest(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    stored = asyncio.run(store.ingest(_chunks(GGUF, 1000)))
    assert (stored.sha256, stored.size, stored.new) == (sha(GGUF), len(GGUF), True)
    assert s3.keys(bucket) == [key(GGUF)]
    assert s3.buckets[bucket][key(GGUF)].data == GGUF
    assert list((store.root / "tmp").iterdir()) == []  # the staged file went with the upload
    assert store.location == f"s3://{bucket}/{PREFIX}/"
    assert store.has(stored.sha256)

    again = store.ingest_sync([GGUF])
    assert not again.new  # known good since it was uploaded: not sent again
    assert [op for op, _ in s3.calls].count("UploadFile") == 1
    assert gets(s3) == 0  # nor read back: it was hashed as it was written


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_failed_upload_leaves_no_staged_file_and_says_retry(
    store: ArtifactStore, s3: FakeS3
) -> None:
    s3.down = True
    with pytest.raises(StorageUnavailable):
        store.ingest_sync([GGUF])
    assert list((store.root / "tmp").iterdir()) == []


# --- checked before serving ------------------------------------------------------------------


def test_an_object_is_hashed_once_per_version_before_it_is_served(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    s3.write(bucket, key(GGUF), GGUF)  # put there by another replica: never checked here
    assert read(store, sha(GGUF)) == GGUF
    assert gets(s3) == 2  # one to hash it, one to serve it
    assert read(store, sha(GGUF), 100, 200) == GGUF[100:200]
    assert gets(s3) == 3  # unchanged: served without hashing again
    s3.write(bucket, key(GGUF), GGUF)  # written again (same bytes, a new Last-Modified)
    assert read(store, sha(GGUF)) == GGUF
    assert gets(s3) == 5
    assert all(body.closed for body in s3.bodies)


def test_every_read_asks_for_the_version_that_was_checked(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    digest = store.ingest_sync([GGUF]).sha256
    blob = store.verified(digest)
    s3.write(bucket, key(GGUF), b"GGUF swapped after the check")
    with pytest.raises(StorageUnavailable, match="changed since it was checked"):
        store.chunks(digest, blob, 0, blob.size)
    with pytest.raises(ArtifactCorrupt):
        store.verified(digest)  # the new version is hashed, and it is wrong


def test_a_changed_object_is_quarantined_and_a_push_restores_it(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    digest = store.ingest_sync([GGUF]).sha256
    s3.write(bucket, key(GGUF), b"GGUF and something else")
    with pytest.raises(ArtifactCorrupt, match="push the model again") as raised:
        store.verified(digest)
    assert raised.value.status == 503
    (quarantined,) = [k for k in s3.keys(bucket) if k != key(GGUF)]
    assert quarantined.startswith(f"{PREFIX}/quarantine/{digest}-")
    assert s3.buckets[bucket][quarantined].data == b"GGUF and something else"
    assert f"s3://{bucket}/{quarantined}" in str(raised.value)
    assert key(GGUF) not in s3.buckets[bucket]
    with pytest.raises(NotFound):
        store.verified(digest)

    assert store.ingest_sync([GGUF]).new
    assert read(store, digest) == GGUF


def test_pushing_again_replaces_a_same_size_object_with_other_bytes(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    s3.write(bucket, key(GGUF), b"X" * len(GGUF))  # the same size: only its hash tells
    assert store.ingest_sync([GGUF]).new
    assert s3.buckets[bucket][key(GGUF)].data == GGUF


def test_an_object_replaced_before_its_quarantine_is_left_alone(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    digest = store.ingest_sync([GGUF]).sha256
    s3.write(bucket, key(GGUF), b"bad bytes")
    stat = store.blobs.stat(digest)  # the bad version, as a check saw it
    assert stat is not None
    s3.write(bucket, key(GGUF), GGUF)  # an admin pushed it again meanwhile
    assert store.blobs.quarantine(digest, stat) == stat.where  # not copied, not deleted
    assert s3.keys(bucket) == [key(GGUF)]
    assert read(store, digest) == GGUF


# --- scrub -----------------------------------------------------------------------------------


def test_scrub_hashes_every_object_across_pages_and_finds_rot(
    store: ArtifactStore, s3: FakeS3, bucket: str
) -> None:
    s3.page_size = 2
    good = [store.ingest_sync([GGUF + bytes([i])]).sha256 for i in range(3)]
    bad = store.ingest_sync([GGUF + b"v2"]).sha256
    s3.rot(bucket, f"{PREFIX}/{bad[:2]}/{bad}", GGUF + b"v3")  # same ETag, same time
    s3.write(bucket, f"{PREFIX}/quarantine/{'0' * 64}-1", b"old")  # not checked
    s3.write(bucket, f"{PREFIX}/notes.txt", b"not the store's")
    assert read(store, bad) == GGUF + b"v3"  # unchanged metadata: the memory trusts it

    seen: list[str] = []
    report = store.scrub(progress=seen.append)
    assert report.checked == 4
    assert seen == sorted([*good, bad])
    assert list(report.corrupt) == [bad]
    assert report.corrupt[bad].startswith(f"s3://{bucket}/{PREFIX}/quarantine/{bad}-")
    assert not store.has(bad)
    assert [op for op, _ in s3.calls].count("ListObjectsV2") == 3  # 6 keys, 2 a page
    assert store.scrub().corrupt == {}


# --- errors ----------------------------------------------------------------------------------


def test_refused_credentials_or_a_missing_bucket_are_config_errors(
    tmp_path: Path, s3: FakeS3, bucket: str
) -> None:
    s3.refuse = True
    store = ArtifactStore(tmp_path, blobs=S3Blobs(s3, S3Layout(bucket)))
    with pytest.raises(ConfigError, match="AccessDenied"):
        store.has(sha(GGUF))
    with pytest.raises(ConfigError, match="AccessDenied"):
        store.ingest_sync([GGUF])
    s3.refuse = False
    missing = ArtifactStore(tmp_path, blobs=S3Blobs(s3, S3Layout("no-such-bucket")))
    with pytest.raises(ConfigError, match="NoSuchBucket"):
        missing.scrub()


def test_an_unreachable_endpoint_is_transient(store: ArtifactStore, s3: FakeS3) -> None:
    digest = store.ingest_sync([GGUF]).sha256
    s3.down = True
    for call in (lambda: store.verified(digest), store.scrub, lambda: store.has(digest)):
        with pytest.raises(StorageUnavailable):
            call()


# --- settings --------------------------------------------------------------------------------


def test_the_settings_choose_the_backend(tmp_path: Path) -> None:
    folder = blobs_for(FleetSettings(data_dir=tmp_path))
    assert isinstance(folder, FolderBlobs)
    assert folder.root == tmp_path / "artifacts"

    with pytest.raises(ConfigError, match="artifact_s3_bucket"):
        blobs_for(FleetSettings(data_dir=tmp_path, artifact_backend="s3"))

    bucket = FleetSettings(
        data_dir=tmp_path,
        artifact_backend="s3",
        artifact_s3_bucket="models",
        artifact_s3_prefix="/fleet/a/",
        artifact_s3_endpoint_url="http://127.0.0.1:9/",
    )
    blobs = blobs_for(bucket)
    assert isinstance(blobs, S3Blobs)
    assert blobs.location == "s3://models/fleet/a/"
    assert bucket.artifact_s3_endpoint_url == "http://127.0.0.1:9"


def test_s3_settings_come_from_the_environment_and_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_FLEET_ARTIFACT_BACKEND", "s3")
    monkeypatch.setenv("EDGEFLEET_FLEET_ARTIFACT_S3_BUCKET", "edge-models")
    monkeypatch.setenv("EDGEFLEET_FLEET_ARTIFACT_S3_PREFIX", "prod")
    settings = FleetSettings(data_dir=tmp_path)
    assert (settings.artifact_backend, settings.artifact_s3_bucket) == ("s3", "edge-models")
    assert settings.artifact_s3_prefix == "prod"
    for bad in [
        {"artifact_backend": "gcs"},
        {"artifact_s3_bucket": "Models/x"},
        {"artifact_s3_endpoint_url": "minio:9000"},
    ]:
        with pytest.raises(ValidationError):
            FleetSettings(data_dir=tmp_path, **bad)


def test_the_controller_refuses_to_start_on_s3_without_a_bucket(tmp_path: Path) -> None:
    from fleet.app import preflight

    with pytest.raises(ConfigError, match="artifact_s3_bucket"):
        preflight(FleetSettings(data_dir=tmp_path, artifact_backend="s3"))
