"""A fake of the S3 client the artifact store uses (:class:`fleet.registry.s3.S3Client`).

In memory, one bucket or more, with only the calls that module makes. It behaves as S3
does where the store depends on it: quoted MD5 ETags, a Last-Modified that every write
moves, ``Range`` and ``If-Match`` on GetObject (206-style slices, 412), ``CopySourceIfMatch``
on copy, paginated listings in key order, and botocore's own ``ClientError`` shapes
(a HEAD of a missing key is code "404", a GET "NoSuchKey"). It records every call, and
can be told to fail: ``refuse`` answers AccessDenied, ``down`` raises botocore's
``EndpointConnectionError``. :meth:`FakeS3.rot` changes an object's bytes but not its
ETag or Last-Modified, as a bad disk under the store would.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError

__all__ = ["FakeBody", "FakeS3", "StoredObject"]

_EPOCH = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


@dataclass
class StoredObject:
    data: bytes
    etag: str
    last_modified: datetime


class FakeBody:
    """A GetObject body: chunks on demand, closed once."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)
        self.closed = False

    def iter_chunks(self, chunk_size: int = 1024) -> Iterator[bytes]:
        while chunk := self._stream.read(chunk_size):
            yield chunk

    def read(self) -> bytes:
        return self._stream.read()

    def close(self) -> None:
        self.closed = True


def _error(code: str, status: int, operation: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"fake S3: {code}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


@dataclass
class FakeS3:
    """Buckets of objects by key; ``calls`` holds ``(operation, key)`` in order."""

    buckets: dict[str, dict[str, StoredObject]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    page_size: int = 1000  # keys per ListObjectsV2 page
    refuse: bool = False  # every call answers AccessDenied
    down: bool = False  # every call fails to connect
    bodies: list[FakeBody] = field(default_factory=list)  # every body handed out
    _ticks: int = 0

    @classmethod
    def with_bucket(cls, name: str, **kw: Any) -> FakeS3:
        return cls(buckets={name: {}}, **kw)

    # -- what tests do to the bucket behind the store's back ---------------------------------

    def write(self, bucket: str, key: str, data: bytes) -> None:
        """Put ``data`` at ``key`` as any writer to the bucket would: a new ETag and time."""
        self._ticks += 1
        etag = f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
        stamp = _EPOCH + timedelta(seconds=self._ticks)
        self.buckets[bucket][key] = StoredObject(data, etag, stamp)

    def rot(self, bucket: str, key: str, data: bytes) -> None:
        """Change the bytes only: ETag and Last-Modified stay (a bad disk, not a write)."""
        self.buckets[bucket][key].data = data

    def keys(self, bucket: str) -> list[str]:
        return sorted(self.buckets[bucket])

    # -- the client ---------------------------------------------------------------------------

    def _enter(self, operation: str, bucket: str, key: str) -> dict[str, StoredObject]:
        self.calls.append((operation, key))
        if self.down:
            raise EndpointConnectionError(endpoint_url="https://s3.fake.test")
        if self.refuse:
            raise _error("AccessDenied", 403, operation)
        if bucket not in self.buckets:
            raise _error("NoSuchBucket", 404, operation)
        return self.buckets[bucket]

    def _object(self, operation: str, bucket: str, key: str, missing: str) -> StoredObject:
        found = self._enter(operation, bucket, key).get(key)
        if found is None:
            raise _error(missing, 404, operation)
        return found

    def head_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]:
        obj = self._object("HeadObject", Bucket, Key, missing="404")
        return {"ContentLength": len(obj.data), "ETag": obj.etag, "LastModified": obj.last_modified}

    def get_object(
        self, *, Bucket: str, Key: str, IfMatch: str | None = None, Range: str | None = None
    ) -> Mapping[str, Any]:
        obj = self._object("GetObject", Bucket, Key, missing="NoSuchKey")
        if IfMatch is not None and IfMatch != obj.etag:
            raise _error("PreconditionFailed", 412, "GetObject")
        data = obj.data
        if Range is not None:
            first, _, last = Range.removeprefix("bytes=").partition("-")
            data = data[int(first) : int(last) + 1]
        body = FakeBody(data)
        self.bodies.append(body)
        return {"Body": body, "ContentLength": len(data), "ETag": obj.etag}

    def upload_file(
        self,
        Filename: str,
        Bucket: str,
        Key: str,
        ExtraArgs: Mapping[str, str] | None = None,
        Callback: Any = None,
        Config: Any = None,
    ) -> None:
        self._enter("UploadFile", Bucket, Key)
        self.write(Bucket, Key, Path(Filename).read_bytes())

    def copy(
        self,
        CopySource: Mapping[str, str],
        Bucket: str,
        Key: str,
        ExtraArgs: Mapping[str, str] | None = None,
        Callback: Any = None,
        SourceClient: Any = None,
        Config: Any = None,
    ) -> None:
        source = self._object("Copy", CopySource["Bucket"], CopySource["Key"], missing="404")
        wanted = (ExtraArgs or {}).get("CopySourceIfMatch")
        if wanted is not None and wanted != source.etag:
            raise _error("PreconditionFailed", 412, "CopyObject")
        self._enter("Copy", Bucket, Key)
        self.write(Bucket, Key, source.data)

    def delete_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]:
        self._enter("DeleteObject", Bucket, Key).pop(Key, None)
        return {}

    def list_objects_v2(
        self, *, Bucket: str, Prefix: str = "", ContinuationToken: str | None = None
    ) -> Mapping[str, Any]:
        objects = self._enter("ListObjectsV2", Bucket, Prefix)
        keys = [k for k in sorted(objects) if k.startswith(Prefix)]
        start = int(ContinuationToken or 0)
        page = keys[start : start + self.page_size]
        more = start + self.page_size < len(keys)
        answer: dict[str, Any] = {"IsTruncated": more, "KeyCount": len(page)}
        if page:
            answer["Contents"] = [{"Key": k, "Size": len(objects[k].data)} for k in page]
        if more:
            answer["NextContinuationToken"] = str(start + self.page_size)
        return answer
