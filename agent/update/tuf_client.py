"""TUF metadata on the device: python-tuf's ngclient, fed by an httpx fetcher.

python-tuf's ``Updater`` does the client workflow (root chain, then timestamp,
snapshot and targets, with signature thresholds, version and expiry checks, and
snapshot/targets pinned by version, length and hash) and persists what it verified in
``metadata_dir``; :class:`HttpxFetcher` is the only I/O it is given (HTTP Basic with
the device id and broker password, timeouts, no redirects). :class:`TufClient` adds
three checks python-tuf leaves to applications, and gives one error tree:

- a root listing one key under two key ids would let that key count twice towards a
  threshold: such a root is refused before ngclient sees it;
- a timestamp with the version already trusted but other content is an equivocating
  repository: ngclient quietly keeps its own; this module says so;
- a verified view older than its own expiry is not used for lookups.

::

    TufError                   every TUF error (a family on agent.errors' tree)
    ├── TufRejected            Rejected: never retry the same metadata, it fails verification.
    │   │                      ``kind`` says which check: signature, version, expired,
    │   │                      mismatch (mix-and-match, wrong length or hash),
    │   │                      duplicate-key, equivocation, malformed, unknown-target,
    │   │                      unsafe-path, director, repository
    │   └── TrustRootMissing   no trusted root.json, or an unreadable one: fail closed
    └── TufUnavailable         Transient: the controller was unreachable, slow, answered an HTTP
                               error, or the local folder could not be written: retry

python-tuf's own exception stays as ``__cause__``. A failed :meth:`TufClient.refresh`
never changes what :meth:`TufClient.target` answers: lookups use the last view that
verified completely (ngclient persists only metadata it verified, and a newer root only
when it is properly chained to the old one, as TUF requires).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import AgentError, Rejected, Transient
from models.director import (
    DirectorKeys,
    TrustError,
    check_target_path,
    director_keys_from_root,
    role_with_repeated_key,
)

__all__ = [
    "FETCH_CHUNK_BYTES",
    "HttpxFetcher",
    "TrustRootMissing",
    "TufClient",
    "TufError",
    "TufRejected",
    "TufUnavailable",
]

log = logging.getLogger(__name__)

FETCH_CHUNK_BYTES: Final = 64 * 1024  # bytes per read from the response
_ROOT_FILE: Final = "root.json"


class TufError(AgentError):
    """Every TUF client error; :func:`agent.errors.retryable` tells the two branches apart."""


class TufRejected(TufError, Rejected):
    """The metadata fails verification; fetching the same again cannot help."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"TUF metadata rejected ({kind}): {message}")
        self.kind = kind


class TrustRootMissing(TufRejected):
    """No trusted root (or an unreadable one): nothing can be verified, so nothing is."""

    def __init__(self, message: str) -> None:
        super().__init__("trust-root", message)


class TufUnavailable(TufError, Transient):
    """The controller could not be reached or answered an error; retry with backoff."""


class _DuplicateKeys(exceptions.RepositoryError):
    """A root listing one key under two key ids (raised inside the fetcher)."""


def _check_root_bytes(data: bytes) -> None:
    """Refuse root metadata that lists one key under two key ids (it could count twice)."""
    try:
        signed = json.loads(data)["signed"]
    except (ValueError, KeyError, TypeError):
        return  # not even JSON: ngclient refuses it with the precise reason
    if isinstance(signed, dict) and signed.get("_type") == Root.type:
        role = role_with_repeated_key(signed)
        if role is not None:
            raise _DuplicateKeys(f"root v{signed.get('version')} lists a {role} key twice")


class HttpxFetcher(FetcherInterface):
    """ngclient's network access: one sync httpx client, bounded in time per file.

    ngclient bounds the size (it stops reading past each role's maximum length); this
    bounds the time, translates httpx errors into tuf's ``DownloadError`` family, and
    remembers the last timestamp it fetched (for the equivocation check).
    """

    def __init__(self, client: httpx.Client, *, deadline_s: float, max_buffer_bytes: int) -> None:
        self._client = client
        self._deadline_s = deadline_s  # seconds for one whole metadata file
        self._max_buffer = max_buffer_bytes  # root and timestamp are read whole: at most this
        self.last_timestamp: bytes | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url)

    def _chunks(self, url: str) -> Iterator[bytes]:
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        is_root = name.endswith(".root.json")
        keep = is_root or name == "timestamp.json"
        body = bytearray()
        started = time.monotonic()
        try:
            with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise exceptions.DownloadHTTPError(
                        f"GET {url}: HTTP {response.status_code}", response.status_code
                    )
                for chunk in response.iter_bytes(FETCH_CHUNK_BYTES):
                    if time.monotonic() - started > self._deadline_s:
                        raise exceptions.SlowRetrievalError(
                            f"GET {url}: not done after {self._deadline_s:.0f} s"
                        )
                    if keep:
                        body += chunk
                        if len(body) > self._max_buffer:
                            raise exceptions.DownloadLengthMismatchError(
                                f"GET {url}: more than {self._max_buffer} bytes"
                            )
                    else:
                        yield chunk
        except httpx.TimeoutException as exc:
            raise exceptions.SlowRetrievalError(f"GET {url}: timed out ({exc})") from exc
        except httpx.HTTPError as exc:
            raise exceptions.DownloadError(f"GET {url}: {exc}") from exc
        if is_root:
            _check_root_bytes(bytes(body))
        elif keep:
            self.last_timestamp = bytes(body)
        if keep:
            yield bytes(body)


def _translate(exc: BaseException) -> TufError:
    """One of ours for what python-tuf (or the disk) raised; the original is the cause."""
    if isinstance(exc, exceptions.DownloadLengthMismatchError):
        return TufRejected("mismatch", f"a metadata file is longer than allowed: {exc}")
    if isinstance(exc, exceptions.DownloadError):
        return TufUnavailable(f"cannot fetch TUF metadata: {exc}")
    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (_DuplicateKeys, "duplicate-key"),
        (exceptions.UnsignedMetadataError, "signature"),
        (exceptions.BadVersionNumberError, "version"),
        (exceptions.ExpiredMetadataError, "expired"),
        (exceptions.LengthOrHashMismatchError, "mismatch"),
        (DeserializationError, "malformed"),
        (exceptions.RepositoryError, "repository"),
    )
    for cls, kind in kinds:
        if isinstance(exc, cls):
            detail = str(exc.__cause__) if kind == "malformed" and exc.__cause__ else str(exc)
            return TufRejected(kind, detail or type(exc).__name__)
    if isinstance(exc, OSError):
        return TufUnavailable(f"cannot write TUF metadata locally: {exc}")
    if isinstance(exc, ValueError | KeyError | TypeError):
        return TufRejected("malformed", str(exc) or type(exc).__name__)
    raise exc


def _safe(path: str) -> None:
    """Only plain relative target paths are looked up (no ``..``, no encoded separators)."""
    try:
        check_target_path(path)
    except TrustError as exc:
        raise TufRejected("unsafe-path", str(exc)) from exc


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TufClient:
    """Verified TUF metadata from the controller, kept in ``metadata_dir``.

    Synchronous and blocking: call it from a worker thread. One instance per
    ``metadata_dir``; calls on it are serialised.
    """

    def __init__(
        self,
        metadata_dir: Path,
        base_url: str,
        *,
        auth: tuple[str, str] | None,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
        config: UpdaterConfig | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.base_url = base_url.rstrip("/") + "/"
        self._config = config or UpdaterConfig()
        self._clock = clock
        self._http = httpx.Client(
            auth=httpx.BasicAuth(*auth) if auth is not None else None,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        )
        self._fetcher = HttpxFetcher(
            self._http,
            deadline_s=timeout_s * 10,
            max_buffer_bytes=max(self._config.root_max_length, self._config.timestamp_max_length),
        )
        self._lock = threading.Lock()
        self._view: Updater | None = None  # the last completely verified refresh
        self._view_expires: datetime | None = None

    def __enter__(self) -> TufClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- trust root -------------------------------------------------------------------------

    def has_root(self) -> bool:
        return (self.metadata_dir / _ROOT_FILE).exists()

    def install_root(self, root_bytes: bytes) -> bool:
        """Trust ``root_bytes`` on first use; False (and nothing changes) if a root is there.

        The root must be TUF root metadata signed by a threshold of its own root keys,
        listing each key once; anything else is refused, leaving the device without a
        root (fail closed).
        """
        with self._lock:
            if self.has_root():
                return False
            try:
                md: Metadata[Any] = Metadata.from_bytes(root_bytes)
                if md.signed.type != Root.type:
                    raise TufRejected("malformed", f"expected root metadata, got {md.signed.type}")
                _check_root_bytes(root_bytes)
                self.metadata_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._updater(bootstrap=root_bytes)  # verifies it, then persists it
            except TufError:
                raise
            except Exception as exc:
                raise _translate(exc) from exc
            log.info("trusting TUF root v%d on first use", md.signed.version)
            return True

    def _updater(self, bootstrap: bytes | None = None) -> Updater:
        return Updater(
            str(self.metadata_dir),
            self.base_url,
            fetcher=self._fetcher,
            config=self._config,
            bootstrap=bootstrap,
        )

    def _open(self) -> Updater:
        """An ngclient ``Updater`` on the trusted local root; TrustRootMissing without one."""
        if not self.has_root():
            raise TrustRootMissing(f"no trusted root.json in {self.metadata_dir}")
        try:
            return self._updater()
        except (OSError, exceptions.RepositoryError, ValueError) as exc:
            raise TrustRootMissing(
                f"the trusted root.json in {self.metadata_dir} is unreadable: {exc}"
            ) from exc

    # --- refresh and lookups ----------------------------------------------------------------

    def refresh(self) -> None:
        """Fetch and verify root (chain), timestamp, snapshot and targets.

        On success lookups use the new view; on failure the previous one stays.
        """
        with self._lock:
            updater = self._open()
            self._fetcher.last_timestamp = None
            try:
                updater.refresh()
            except Exception as exc:
                raise _translate(exc) from exc
            self._check_equivocation()
            self._view = updater
            self._view_expires = self._earliest_expiry()

    def _local(self, role: str) -> Metadata[Any]:
        return Metadata.from_bytes((self.metadata_dir / f"{role}.json").read_bytes())

    def _check_equivocation(self) -> None:
        """A timestamp with the trusted version but other content: the repository forked."""
        fetched = self._fetcher.last_timestamp
        if fetched is None:
            return
        try:
            remote: Metadata[Any] = Metadata.from_bytes(fetched)
            trusted = self._local(Timestamp.type)
        except (OSError, exceptions.RepositoryError) as exc:
            raise _translate(exc) from exc
        if remote.signed.version == trusted.signed.version and remote.signed != trusted.signed:
            raise TufRejected(
                "equivocation",
                f"timestamp v{trusted.signed.version} was served with other content than "
                "the one already trusted",
            )

    def _earliest_expiry(self) -> datetime:
        try:
            expiries: list[datetime] = [
                self._local(role).signed.expires
                for role in (Root.type, Timestamp.type, Snapshot.type, Targets.type)
            ]
            return min(expiries)
        except (OSError, exceptions.RepositoryError) as exc:
            raise _translate(exc) from exc

    def _verified(self) -> Updater:
        if self._view is None:
            raise TufRejected("expired", "no verified TUF metadata yet: refresh first")
        if self._view_expires is not None and self._clock() >= self._view_expires:
            raise TufRejected(
                "expired", f"the verified TUF metadata expired at {self._view_expires}: refresh"
            )
        return self._view

    def find(self, path: str) -> TargetFile | None:
        """The verified target at ``path``, or None when the targets metadata lacks it."""
        _safe(path)
        with self._lock:
            view = self._verified()
            try:
                return view.get_targetinfo(path)
            except Exception as exc:
                raise _translate(exc) from exc

    def target(self, path: str) -> TargetFile:
        """The verified target at ``path`` (length, hashes, custom); refreshes first if never."""
        _safe(path)
        if self._view is None:
            self.refresh()
        info = self.find(path)
        if info is None:
            raise TufRejected("unknown-target", f"{path!r} is not in the TUF targets metadata")
        return info

    def director_keys(self) -> DirectorKeys:
        """The keys that may sign desired states, from the trusted (verified) root."""
        with self._lock:
            if self._view is None:
                self._open()  # verifies the local root against itself
            try:
                root = self._local(Root.type)
            except (OSError, exceptions.RepositoryError) as exc:
                raise TrustRootMissing(f"the trusted root.json is unreadable: {exc}") from exc
        try:
            return director_keys_from_root(root.signed.to_dict())
        except TrustError as exc:
            raise TufRejected("director", str(exc)) from exc
