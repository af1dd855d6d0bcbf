"""The S3 backend over real HTTP and real botocore, against moto's S3 server in a thread.

What the fake client cannot show: boto3's multipart upload and copy, botocore's
signing, ``If-Match`` and ``Range`` as an S3 server answers them, and the download
route streaming an object through the controller to a device (with Range resume).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer
from pydantic import SecretStr
from typer.testing import CliRunner

from fleet.app import create_app
from fleet.cli import app as fleet_cli
from fleet.config import FleetSettings
from fleet.errors import ArtifactCorrupt, NotFound, StorageUnavailable
from fleet.registry.s3 import S3Blobs, S3Layout, shared_client
from fleet.registry.store import ArtifactStore
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN, ADMIN_TOKEN, Clock, error
from tests.fleet.test_registry import GGUF, device_auth, sha, upload, uploaded

REGION = "us-east-1"
PART = 5 * 2**20  # S3's smallest part: objects over it go up (and are copied) in parts


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials as a replica gets them: the AWS chain (here its environment variables)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def admin_s3(endpoint: str) -> Any:
    """A client of the test's own, for what others do to the bucket behind the store."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture
def bucket(admin_s3: Any) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    admin_s3.create_bucket(Bucket=name)
    return name


def big(tag: bytes) -> bytes:
    """Two parts and a bit: a multipart upload."""
    return b"GGUF" + tag + bytes(range(256)) * (PART // 256 + 4096)


def test_multipart_upload_range_reads_quarantine_and_scrub(
    tmp_path: Path, endpoint: str, admin_s3: Any, bucket: str
) -> None:
    small_parts = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    blobs = S3Blobs(shared_client(endpoint, REGION), S3Layout(bucket, "a"), transfer=small_parts)
    store = ArtifactStore(tmp_path, blobs=blobs)
    data = big(b"good")
    digest = store.ingest_sync([data[:PART], data[PART:]]).sha256
    key = f"a/{digest[:2]}/{digest}"
    head = admin_s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].endswith('-2"')  # two parts, not one PUT

    blob = store.verified(digest)
    assert b"".join(store.chunks(digest, blob, 0, blob.size)) == data
    assert b"".join(store.chunks(digest, blob, PART - 10, PART + 10)) == data[PART - 10 : PART + 10]

    # Someone with write access replaces it: If-Match refuses the old check's reads, and
    # the new bytes are hashed, found wrong, copied aside (in parts) and deleted.
    admin_s3.put_object(Bucket=bucket, Key=key, Body=big(b"evil"))
    with pytest.raises(StorageUnavailable, match="changed since it was checked"):
        store.chunks(digest, blob, 0, 10)
    with pytest.raises(ArtifactCorrupt):
        store.verified(digest)
    with pytest.raises(NotFound):
        store.verified(digest)
    listed = admin_s3.list_objects_v2(Bucket=bucket, Prefix="a/quarantine/")["Contents"]
    (quarantined,) = [item["Key"] for item in listed]
    body = admin_s3.get_object(Bucket=bucket, Key=quarantined)["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(big(b"evil")).digest()

    assert store.ingest_sync([data]).new  # pushed again
    other = store.ingest_sync([GGUF]).sha256
    admin_s3.put_object(Bucket=bucket, Key=f"a/{other[:2]}/{other}", Body=b"GGUF, swapped")
    report = store.scrub()
    assert report.checked == 2
    assert list(report.corrupt) == [other]
    assert store.scrub().corrupt == {}


# --- the download route, streaming from the bucket ------------------------------------------


@pytest.fixture
def s3_settings(tmp_path: Path, endpoint: str, bucket: str) -> FleetSettings:
    return FleetSettings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        admin_token=SecretStr(ADMIN_TOKEN),
        broker_url="mqtt://broker.test:1883",
        public_url="https://fleet.example.com",
        artifact_backend="s3",
        artifact_s3_bucket=bucket,
        artifact_s3_prefix="fleet",
        artifact_s3_endpoint_url=endpoint,
        artifact_s3_region=REGION,
    )


@pytest.fixture
def api(s3_settings: FleetSettings, clock: Clock) -> Iterator[TestClient]:
    app = create_app(s3_settings, FakeLink().factory(), clock=clock)
    with TestClient(app, headers=ADMIN) as client:
        yield client


def test_uploads_go_to_the_bucket_and_nothing_stays_on_disk(
    api: TestClient, admin_s3: Any, bucket: str, s3_settings: FleetSettings
) -> None:
    body = uploaded(api)
    assert body["sha256"] == sha(GGUF)
    stored = admin_s3.get_object(Bucket=bucket, Key=f"fleet/{sha(GGUF)[:2]}/{sha(GGUF)}")
    assert stored["Body"].read() == GGUF
    assert not (s3_settings.resolved_artifact_dir / "sha256").exists()
    assert list((s3_settings.resolved_artifact_dir / "tmp").iterdir()) == []
    assert upload(api, GGUF).status_code == 200  # the same file again: no new row


def test_a_device_downloads_from_the_bucket_through_the_controller(
    api: TestClient, clock: Clock
) -> None:
    body = uploaded(api)
    _, auth = device_auth(api, clock)
    url = f"/api/v1/artifacts/{body['sha256']}"
    size = len(GGUF)

    whole = api.get(url, headers=auth)
    assert whole.status_code == 200, whole.text
    assert whole.content == GGUF
    assert whole.headers["etag"] == f'"{sha(GGUF)}"'
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(size)
    assert whole.headers["x-edgefleet-yanked"] == "false"
    head = api.head(url, headers=auth)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, str(size), b"")

    part = api.get(url, headers={**auth, "Range": "bytes=100-199"})
    assert (part.status_code, part.content) == (206, GGUF[100:200])
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    assert part.headers["content-length"] == "100"
    rest = api.get(url, headers={**auth, "Range": "bytes=5000-"})
    assert (rest.status_code, rest.content) == (206, GGUF[5000:])
    assert rest.headers["content-range"] == f"bytes 5000-{size - 1}/{size}"
    tail = api.get(url, headers={**auth, "Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, GGUF[-10:])
    beyond = api.get(url, headers={**auth, "Range": f"bytes={size}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"
    same = api.get(url, headers={**auth, "Range": "bytes=10-", "If-Range": f'"{sha(GGUF)}"'})
    assert (same.status_code, same.content) == (206, GGUF[10:])
    changed = api.get(url, headers={**auth, "Range": "bytes=10-", "If-Range": '"other"'})
    assert (changed.status_code, changed.content) == (200, GGUF)


def test_a_changed_object_is_answered_503_and_served_again_after_a_push(
    api: TestClient, clock: Clock, admin_s3: Any, bucket: str
) -> None:
    body = uploaded(api)
    _, auth = device_auth(api, clock)
    url = f"/api/v1/artifacts/{body['sha256']}"
    key = f"fleet/{sha(GGUF)[:2]}/{sha(GGUF)}"
    admin_s3.put_object(Bucket=bucket, Key=key, Body=GGUF[:-1] + b"!")

    status, code, message = error(api.get(url, headers={**auth, "Range": "bytes=0-99"}))
    assert (status, code) == (503, "artifact_corrupt")
    assert "push the model again" in message
    assert api.head(url, headers=auth).status_code == 404  # quarantined: nothing to send
    listed = admin_s3.list_objects_v2(Bucket=bucket, Prefix="fleet/quarantine/")
    assert len(listed["Contents"]) == 1

    assert upload(api, GGUF).status_code == 200
    response = api.get(url, headers=auth)
    assert (response.status_code, response.content) == (200, GGUF)


def test_the_scrub_command_checks_the_bucket_the_environment_names(
    tmp_path: Path, endpoint: str, admin_s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "BACKEND": "s3",
        "S3_BUCKET": bucket,
        "S3_PREFIX": "nightly",
        "S3_ENDPOINT_URL": endpoint,
        "S3_REGION": REGION,
    }.items():
        monkeypatch.setenv(f"EDGEFLEET_FLEET_ARTIFACT_{name}", value)
    good, bad = sha(GGUF), sha(GGUF + b"v2")
    admin_s3.put_object(Bucket=bucket, Key=f"nightly/{good[:2]}/{good}", Body=GGUF)
    admin_s3.put_object(Bucket=bucket, Key=f"nightly/{bad[:2]}/{bad}", Body=b"not the model")
    scrub = ["models", "scrub", "--data-dir", str(tmp_path)]

    result = CliRunner().invoke(fleet_cli, [*scrub, "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["checked"] == 2
    assert list(report["corrupt"]) == [bad]
    assert report["corrupt"][bad].startswith(f"s3://{bucket}/nightly/quarantine/{bad}-")

    again = CliRunner().invoke(fleet_cli, scrub)
    assert again.exit_code == 0, again.output
    assert f"checked 1 artifact(s) in s3://{bucket}/nightly/" in again.stdout

    monkeypatch.delenv("EDGEFLEET_FLEET_ARTIFACT_S3_BUCKET")
    unset = CliRunner().invoke(fleet_cli, scrub)
    assert unset.exit_code == 2
    assert "artifact_s3_bucket" in unset.stderr
