"""Blobs in an S3-compatible bucket: AWS S3, MinIO, Ceph RGW, Cloudflare R2.

Keys are ``<prefix>/<sha[:2]>/<sha>``; a corrupt object is copied to
``<prefix>/quarantine/<sha>-<ns>`` and deleted. The controller uploads files it has
already hashed (multipart above :data:`PART_BYTES`) and streams objects to devices
itself, so devices need no S3 credentials and their TUF length and hash checks are
those of the folder backend. Credentials come from boto3's standard chain
(``AWS_*`` variables, the shared config and credentials files, web identity, container
and instance roles), never from the controller's settings.

What a check is remembered by (:class:`ObjectVersion`) is the ETag with Last-Modified
and, in a versioned bucket, the version id: the ETag alone is an MD5 for a single-part
upload, which someone who can write to the bucket can collide, while Last-Modified is
the server's own clock. Every read asks for that ETag (``If-Match``), so the bytes a
device gets are the version that was hashed; a replaced object answers 412, which is
``StorageUnavailable`` (the next request hashes the new version).

Errors are translated here: a missing object is ``None`` or ``NotFound``; refused
credentials, permissions or bucket are ``ConfigError`` (an operator must act); the
rest (timeouts, 5xx, a dropped connection) ``StorageUnavailable``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, cast

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from fleet.errors import ConfigError, FleetError, NotFound, StorageUnavailable
from fleet.registry.blobs import BlobStat, check_digest

__all__ = [
    "PART_BYTES",
    "READ_CHUNK_BYTES",
    "ObjectVersion",
    "S3Blobs",
    "S3Client",
    "S3Layout",
    "shared_client",
]

log = logging.getLogger(__name__)

PART_BYTES = 64 * 2**20  # bytes per part of a multipart upload or copy, and its threshold
READ_CHUNK_BYTES = 1024 * 1024  # bytes per piece of an object streamed to a device
_UPLOAD_THREADS = 8  # parts of one upload in flight at once

_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_CHANGED = frozenset({"412", "PreconditionFailed"})
_REFUSED = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",  # the wrong region
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "PermanentRedirect",  # the wrong region
        "SignatureDoesNotMatch",
    }
)


class S3Client(Protocol):
    """The calls of a boto3 S3 client this module makes, and nothing else."""

    def head_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]: ...

    def get_object(self, **kwargs: str) -> Mapping[str, Any]: ...

    def list_objects_v2(self, **kwargs: str) -> Mapping[str, Any]: ...

    def delete_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]: ...

    def upload_file(
        self,
        Filename: str,
        Bucket: str,
        Key: str,
        ExtraArgs: Mapping[str, str] | None = None,
        Callback: Any = None,
        Config: TransferConfig | None = None,
    ) -> None: ...

    def copy(
        self,
        CopySource: Mapping[str, str],
        Bucket: str,
        Key: str,
        ExtraArgs: Mapping[str, str] | None = None,
        Callback: Any = None,
        SourceClient: Any = None,
        Config: TransferConfig | None = None,
    ) -> None: ...


@functools.cache
def shared_client(endpoint_url: str | None, region: str | None) -> S3Client:
    """One client per endpoint and region in a process.

    Clients are thread-safe and reused by every request; making one is slow (a
    session, its service models, the credential chain) and, from boto3's shared default
    session, not thread-safe, so each is made once, from a session of its own.
    """
    # Stores other than AWS may refuse the checksums botocore adds by default.
    checksums: Literal["when_supported", "when_required"] = (
        "when_supported" if endpoint_url is None else "when_required"
    )
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=10,  # seconds
        read_timeout=60,  # seconds without a byte
        max_pool_connections=64,  # the route's thread pool, and upload threads
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )
    return cast(S3Client, client)


class ObjectVersion(NamedTuple):
    """What moves whenever an object's bytes can have changed."""

    etag: str  # quoted, as S3 sends it
    last_modified: str  # the server's time of the write
    version_id: str  # "" in a bucket without versioning


@dataclass(frozen=True)
class S3Layout:
    """Where an address lives in a bucket: ``<prefix>/<sha[:2]>/<sha>``."""

    bucket: str
    prefix: str = ""  # no leading or trailing "/"; "" puts blobs at the bucket's top

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ConfigError(f"{self.bucket!r} is not an S3 bucket name")
        if self.prefix != self.prefix.strip("/"):
            raise ConfigError(f"the S3 prefix {self.prefix!r} must not start or end with '/'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def key(self, sha256: str) -> str:
        digest = check_digest(sha256)
        return f"{self.base}{digest[:2]}/{digest}"

    def quarantine_key(self, sha256: str, when_ns: int) -> str:
        return f"{self.base}quarantine/{check_digest(sha256)}-{when_ns}"

    def address_of(self, key: str) -> str | None:
        """The address a key holds; None for anything else under the prefix."""
        found = re.fullmatch(r"([0-9a-f]{2})/([0-9a-f]{64})", key.removeprefix(self.base))
        if not key.startswith(self.base) or found is None:
            return None
        return found[2] if found[2][:2] == found[1] else None

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


class S3Blobs:
    """Objects by address in one bucket, under one prefix."""

    def __init__(
        self, client: S3Client, layout: S3Layout, *, transfer: TransferConfig | None = None
    ) -> None:
        self._client = client
        self.layout = layout
        self._transfer = transfer or TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=_UPLOAD_THREADS,
        )

    @property
    def location(self) -> str:
        return self.layout.uri(self.layout.base)

    def stat(self, sha256: str) -> BlobStat | None:
        key = self.layout.key(sha256)
        try:
            head = self._client.head_object(Bucket=self.layout.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise _error(f"cannot read artifact {sha256}", exc) from None
        except BotoCoreError as exc:
            raise _error(f"cannot read artifact {sha256}", exc) from None
        version = ObjectVersion(
            etag=str(head["ETag"]),
            last_modified=str(head["LastModified"]),
            version_id=str(head.get("VersionId") or ""),
        )
        return BlobStat(self.layout.uri(key), int(head["ContentLength"]), version)

    def put(self, sha256: str, staged: Path) -> BlobStat:
        key = self.layout.key(sha256)
        try:
            self._client.upload_file(
                str(staged),
                self.layout.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise _error(f"cannot upload artifact {sha256}", exc) from None
        finally:
            staged.unlink(missing_ok=True)
        stat = self.stat(sha256)
        if stat is None:
            raise StorageUnavailable(f"artifact {sha256} went away as it was stored")
        return stat

    def digest(self, sha256: str, stat: BlobStat) -> str:
        hashed = hashlib.sha256()
        for chunk in self._stream(sha256, self._get(sha256, stat)):
            hashed.update(chunk)
        return hashed.hexdigest()

    def chunks(self, sha256: str, stat: BlobStat, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return iter(())
        return self._stream(sha256, self._get(sha256, stat, f"bytes={start}-{end - 1}"))

    def quarantine(self, sha256: str, stat: BlobStat) -> str:
        bucket, key = self.layout.bucket, self.layout.key(sha256)
        target = self.layout.quarantine_key(sha256, time.time_ns())
        try:
            self._client.copy(
                {"Bucket": bucket, "Key": key},
                bucket,
                target,
                ExtraArgs={"CopySourceIfMatch": _etag(stat)},
                Config=self._transfer,
            )
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return self.layout.uri(f"{self.layout.base}quarantine/")  # another moved it first
            log.error("cannot copy corrupt artifact %s to quarantine: %s", stat.where, exc)
            return stat.where  # replaced meanwhile (412), or refused: left where it is
        except BotoCoreError as exc:
            log.error("cannot copy corrupt artifact %s to quarantine: %s", stat.where, exc)
            return stat.where
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            log.error("corrupt artifact %s copied to quarantine, not deleted: %s", key, exc)
        log.error("artifact %s does not match its address: moved to %s", sha256, target)
        return self.layout.uri(target)

    def addresses(self) -> Iterator[str]:
        request = {"Bucket": self.layout.bucket, "Prefix": self.layout.base}
        try:
            while True:
                page = self._client.list_objects_v2(**request)
                for item in page.get("Contents", []):
                    address = self.layout.address_of(str(item["Key"]))
                    if address is not None:
                        yield address
                if not page.get("IsTruncated"):
                    return
                request["ContinuationToken"] = str(page["NextContinuationToken"])
        except (BotoCoreError, ClientError) as exc:
            raise _error(f"cannot list {self.location}", exc) from None

    def _get(self, sha256: str, stat: BlobStat, byte_range: str | None = None) -> Any:
        """The body of that version (or of a range of it); the request is made now."""
        request = {"Bucket": self.layout.bucket, "Key": self.layout.key(sha256)}
        request["IfMatch"] = _etag(stat)
        if byte_range is not None:
            request["Range"] = byte_range
        try:
            return self._client.get_object(**request)["Body"]
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFound(f"no artifact {sha256}") from None
            if _code(exc) in _CHANGED:
                raise StorageUnavailable(
                    f"artifact {sha256} changed since it was checked: try again"
                ) from None
            raise _error(f"cannot read artifact {sha256}", exc) from None
        except BotoCoreError as exc:
            raise _error(f"cannot read artifact {sha256}", exc) from None

    @staticmethod
    def _stream(sha256: str, body: Any) -> Iterator[bytes]:
        """The body's bytes in pieces; closed when done, failed or dropped."""
        try:
            yield from body.iter_chunks(READ_CHUNK_BYTES)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StorageUnavailable(f"reading artifact {sha256} failed: {exc}") from None
        finally:
            body.close()


def _etag(stat: BlobStat) -> str:
    if not isinstance(stat.version, ObjectVersion):
        raise TypeError(f"{stat.where} is not an S3 object's version")
    return stat.version.etag


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _error(what: str, exc: Exception) -> FleetError:
    """The controller's error for a failed S3 call: refused (ConfigError) or transient."""
    # boto3 raises S3UploadFailedError inside its handler of the ClientError.
    cause = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return ConfigError(
            f"{what}: no AWS credentials found; give this replica AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE) or a role"
        )
    if isinstance(cause, ClientError) and _code(cause) in _REFUSED:
        return ConfigError(
            f"{what}: S3 refused it ({_code(cause)}); check artifact_s3_bucket, the endpoint, "
            "the region and this replica's credentials and permissions"
        )
    return StorageUnavailable(f"{what}: {exc}")
