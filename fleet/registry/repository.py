"""The controller's TUF repository: root, targets, snapshot and timestamp, on disk.

Metadata is written with python-tuf's metadata API into ``<dir>/metadata/`` with
consistent snapshots: ``N.root.json``, ``N.targets.json`` and ``N.snapshot.json`` are
written once and never change; ``timestamp.json`` is the one file replaced in place,
and it is written last, so a device (or a crash) sees the old repository or the new
one, never a mix. Every file is written durably (:func:`fleet.files.atomic_write`);
metadata is public by design, so its files are 0644. Snapshot pins the targets file
and timestamp pins the snapshot file by version, length and sha256, so a device can
detect any mix-and-match.

Keys come from a :class:`~fleet.registry.keys.KeyStore`; which ones count is decided
by the current root alone. Snapshot, timestamp and director keys must be online. Root
and targets keys may be kept elsewhere:

- targets offline: :meth:`TufRepository.add_targets` *stages* the next targets metadata
  (``<dir>/staged/targets.json``); an admin signs it with ``edgefleet keys sign`` on
  the machine holding the keys and brings it back to :meth:`TufRepository.import_targets`.
- root offline: :meth:`TufRepository.rotate` stages the next root when it cannot reach
  both thresholds (old and new root keys, the TUF rule); the signed root comes back
  through :meth:`TufRepository.import_root`.

The director's public keys (who may sign desired states) ride in the root's signed
object under :data:`models.director.DIRECTOR_ROOT_FIELD`, so they rotate like a role.

No state is kept in memory: every operation reads the files, under an exclusive
``flock`` on ``<dir>/.lock`` when it writes, so replicas sharing the folder (and the
``edgefleet keys`` commands run beside a live controller) never interleave writes.
Failures use the controller's error tree (:mod:`fleet.errors`): ``InvalidInput`` and
``Conflict`` for metadata that is refused, ``ConfigError`` for a repository or key
store that cannot work as it is, ``StorageUnavailable`` for I/O errors.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.api.serialization.json import JSONSerializer

from fleet.errors import ConfigError as RepositoryUnusable
from fleet.errors import Conflict, InvalidInput, NotFound, StorageUnavailable
from fleet.files import PUBLIC_FILE, atomic_write
from fleet.registry.keys import ROLES, KeyStore, check_role
from fleet.registry.targets import TargetDescription
from models.director import (
    DIRECTOR_ROOT_FIELD,
    TrustError,
    check_target_path,
    director_keys_from_root,
    director_root_field,
    role_with_repeated_key,
)

__all__ = [
    "METADATA_FILE",
    "RELEASES_FIELD",
    "TOP_LEVEL_ROLES",
    "Expiries",
    "InitResult",
    "RoleStatus",
    "RootChange",
    "TargetsChange",
    "TufRepository",
    "check_root",
]

log = logging.getLogger(__name__)

TOP_LEVEL_ROLES: Final = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
METADATA_FILE: Final = re.compile(
    r"^(?:([1-9][0-9]{0,18})\.)?(root|targets|snapshot|timestamp)\.json$"
)
RELEASES_FIELD: Final = "x-edgefleet-releases"  # in targets' signed object: {model: counter}
MAX_METADATA_BYTES: Final = 5_000_000  # the largest metadata file imported (ngclient's cap)
OFFLINE_CAPABLE: Final = (Root.type, Targets.type)  # roles whose keys may leave the controller
OFFLINE_WARNING: Final = timedelta(days=30)  # warn this long before offline-signed roles expire

_SERIALIZER = JSONSerializer(compact=False)  # readable by the admin who signs it offline
_S = TypeVar("_S", Root, Targets, Snapshot, Timestamp)


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata stays valid, and when it is renewed."""

    root: timedelta = timedelta(days=365)  # root is re-signed rarely, often offline
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)  # a device cut off this long stops trusting
    renew_fraction: float = 0.5  # re-sign once less than this share of a lifetime is left

    def of(self, role: str) -> timedelta:
        lifetime: timedelta = getattr(self, role)
        return lifetime


@dataclass(frozen=True)
class RoleStatus:
    """One role as the current root and its metadata describe it."""

    role: str
    version: int | None  # None for the director, whose keys live in root
    expires: datetime | None
    keyids: tuple[str, ...]
    threshold: int
    online: tuple[str, ...]  # the key ids whose private keys this controller holds


@dataclass(frozen=True)
class TargetsChange:
    """What :meth:`TufRepository.add_targets` did."""

    added: tuple[str, ...]  # target paths new in this change (empty: all already there)
    version: int  # the targets version holding them
    published: bool  # False: staged, waiting for offline targets signatures


@dataclass(frozen=True)
class RootChange:
    """What :meth:`TufRepository.rotate` did."""

    role: str
    version: int  # the new root version
    published: bool  # False: staged, waiting for root signatures
    keyids: tuple[str, ...]  # the role's new key ids
    key_files: tuple[Path, ...]  # where their private keys were written
    missing: str = ""  # which signatures a staged root still needs


@dataclass(frozen=True)
class InitResult:
    """What :meth:`TufRepository.init` created."""

    keyids: Mapping[str, tuple[str, ...]]  # role -> key ids
    offline_files: tuple[Path, ...]  # private keys written outside the controller's store


# --- pure checks ---------------------------------------------------------------------------


def check_root(root: Root) -> None:
    """Refuse a root that could let one key count twice or names no usable director.

    python-tuf counts signatures per key id, so one key listed under two key ids of a
    role would meet a threshold of 2 alone; the root must list distinct keys.
    """
    for name, role in root.roles.items():
        if role.threshold > len(role.keyids):
            raise InvalidInput(
                f"root role {name!r} needs {role.threshold} signatures but lists "
                f"{len(role.keyids)} keys"
            )
        for keyid in role.keyids:
            if keyid not in root.keys:
                raise InvalidInput(f"root role {name!r} names key {keyid}, which root lacks")
    repeated = role_with_repeated_key(root.to_dict())
    if repeated is not None:
        raise InvalidInput(f"root role {repeated!r} lists one key under two key ids")
    try:
        director_keys_from_root(root.to_dict())
    except TrustError as exc:
        raise InvalidInput(str(exc)) from None


def _verification(root: Root, role: str, md: Metadata[Any]) -> tuple[bool, str]:
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    return result.verified, f"{len(result.signed)} of {result.threshold} {role} signatures"


def _root_verification(old: Root, new: Metadata[Root]) -> tuple[bool, str]:
    result = new.signed.get_root_verification_result(old, new.signed_bytes, new.signatures)
    first, second = result.first, result.second
    summary = (
        f"{len(first.signed)} of {first.threshold} current root signatures, "
        f"{len(second.signed)} of {second.threshold} new root signatures"
    )
    return result.verified, summary


def _parse(data: bytes, cls: type[_S]) -> Metadata[_S]:
    if len(data) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as exc:
        cause = exc.__cause__ or exc
        raise InvalidInput(f"not TUF metadata: {cause}") from None
    if md.signed.type != cls.type:
        raise InvalidInput(f"expected {cls.type} metadata, got {md.signed.type}")
    return md


def _target_file(desc: TargetDescription, release: int) -> TargetFile:
    custom = {**copy.deepcopy(desc.custom), "release": release}
    return TargetFile(desc.length, dict(desc.hashes), desc.path, {"custom": custom})


def _model_name(target: TargetFile) -> str:
    custom = target.custom if isinstance(target.custom, dict) else {}
    name = custom.get("name")
    return name if isinstance(name, str) else target.path.split("/", 1)[0]


def _releases(targets: Targets) -> dict[str, int]:
    """The highest release counter per model, from the field and from every target."""
    raw = targets.unrecognized_fields.get(RELEASES_FIELD)
    counters = {
        str(k): v for k, v in (raw or {}).items() if isinstance(v, int) and not isinstance(v, bool)
    }
    for target in targets.targets.values():
        custom = target.custom if isinstance(target.custom, dict) else {}
        release = custom.get("release")
        if isinstance(release, int) and not isinstance(release, bool):
            name = _model_name(target)
            counters[name] = max(counters.get(name, 0), release)
    return counters


class TufRepository:
    """TUF metadata under ``path`` signed with keys from ``keys``; see the module docstring."""

    def __init__(self, path: Path, keys: KeyStore, expiries: Expiries | None = None) -> None:
        self.path = path
        self.keys = keys
        self.expiries = expiries or Expiries()
        self.metadata_dir = path / "metadata"
        self.staged_dir = path / "staged"
        self._director: tuple[int, list[Signer]] | None = None  # (root version, signers)

    # --- reading ----------------------------------------------------------------------------

    def exists(self) -> bool:
        """A repository was initialised here (a root and a timestamp are present)."""
        return (self.metadata_dir / "timestamp.json").is_file() and self._root_version() > 0

    def read(self, filename: str) -> bytes:
        """A metadata file as devices fetch it; un-versioned names give the current one."""
        match = METADATA_FILE.fullmatch(filename)
        if match is None:
            raise NotFound(f"no TUF metadata {filename[:80]!r}")
        version, role = match.group(1), match.group(2)
        if version is None and role != Timestamp.type:
            filename = f"{self._current_version(role)}.{role}.json"
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no TUF metadata {filename!r}") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read TUF metadata {filename}: {exc}") from None

    def root_json(self) -> bytes:
        """The current root: what a device is given to trust on first use."""
        return self.read("root.json")

    def root(self) -> Root:
        return self._load(f"{self._root_version()}.root.json", Root).signed

    def targets(self) -> dict[str, TargetFile]:
        """The published (signed) targets by path."""
        return dict(self._current_targets().signed.targets)

    def staged_targets_version(self) -> int | None:
        staged = self._staged(Targets)
        return staged.signed.version if staged is not None else None

    def staged_root_version(self) -> int | None:
        staged = self._staged(Root)
        return staged.signed.version if staged is not None else None

    def has_target(self, path: str) -> bool:
        """Published or staged."""
        staged = self._staged(Targets)
        return path in self.targets() or (staged is not None and path in staged.signed.targets)

    def director_signers(self) -> list[Signer]:
        """The online director keys the current root names (they sign desired states).

        Cached per root version: a desired state is signed per device, and only a new
        root can change the director keys.
        """
        version = self._root_version()
        cached = self._director
        if cached is not None and cached[0] == version:
            return list(cached[1])
        director = director_keys_from_root(self.root().to_dict())
        keyids = [key.keyid for key in director.keys]
        signers: list[Signer] = list(self.keys.signers("director", only=keyids))
        if len(signers) < director.threshold:
            raise RepositoryUnusable(
                f"the controller holds {len(signers)} of the {director.threshold} director "
                f"keys the root requires (in {self.keys.role_dir('director')})"
            )
        self._director = (version, signers)
        return list(signers)

    def status(self) -> list[RoleStatus]:
        """Every role: version, expiry, key ids, threshold, which keys are online."""
        root_md = self._load(f"{self._root_version()}.root.json", Root)
        root = root_md.signed
        metadata: dict[str, Signed] = {
            Root.type: root,
            Targets.type: self._current_targets().signed,
            Snapshot.type: self._current_snapshot().signed,
            Timestamp.type: self._timestamp().signed,
        }
        result = []
        for name in TOP_LEVEL_ROLES:
            role = root.roles[name]
            signed = metadata[name]
            online = tuple(k for k in self.keys.keyids(name) if k in role.keyids)
            result.append(
                RoleStatus(
                    name, signed.version, signed.expires, tuple(role.keyids), role.threshold, online
                )
            )
        director = director_keys_from_root(root.to_dict())
        keyids = tuple(key.keyid for key in director.keys)
        online = tuple(k for k in self.keys.keyids("director") if k in keyids)
        result.append(RoleStatus("director", None, None, keyids, director.threshold, online))
        return result

    def _root_version(self) -> int:
        try:
            names = [p.name for p in self.metadata_dir.iterdir()]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageUnavailable(f"cannot list {self.metadata_dir}: {exc}") from None
        versions = [int(m.group(1)) for n in names if (m := METADATA_FILE.fullmatch(n))
                    and m.group(2) == Root.type and m.group(1)]  # fmt: skip
        return max(versions, default=0)

    def _current_version(self, role: str) -> int:
        if role == Root.type:
            version = self._root_version()
            if version == 0:
                raise NotFound("no TUF root yet")
            return version
        timestamp = self._timestamp().signed
        if role == Snapshot.type:
            return timestamp.snapshot_meta.version
        return self._current_snapshot().signed.meta["targets.json"].version

    def _load(self, filename: str, cls: type[_S]) -> Metadata[_S]:
        path = self.metadata_dir / filename
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryUnusable(
                f"the TUF repository in {self.path} has no {filename}: "
                "run `edgefleet keys init` (or start the controller once)"
            ) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {path}: {exc}") from None
        try:
            return _parse(data, cls)
        except InvalidInput as exc:
            raise RepositoryUnusable(f"{path} is unusable: {exc}") from None

    def _timestamp(self) -> Metadata[Timestamp]:
        return self._load("timestamp.json", Timestamp)

    def _current_snapshot(self) -> Metadata[Snapshot]:
        version = self._timestamp().signed.snapshot_meta.version
        return self._load(f"{version}.snapshot.json", Snapshot)

    def _current_targets(self) -> Metadata[Targets]:
        version = self._current_snapshot().signed.meta["targets.json"].version
        return self._load(f"{version}.targets.json", Targets)

    def _staged(self, cls: type[_S]) -> Metadata[_S] | None:
        path = self.staged_dir / f"{cls.type}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {path}: {exc}") from None
        try:
            return _parse(data, cls)
        except InvalidInput as exc:
            raise RepositoryUnusable(f"{path} is unusable: {exc}") from None

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across threads, processes and replicas sharing the folder."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.metadata_dir.mkdir(mode=0o755, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageUnavailable(f"cannot open the TUF repository {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_md(self, directory: Path, filename: str, md: Metadata[Any]) -> bytes:
        try:
            data = md.to_bytes(_SERIALIZER)
        except SerializationError as exc:
            raise InvalidInput(f"cannot serialise {filename}: {exc.__cause__ or exc}") from None
        path = directory / filename
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            atomic_write(path, data, mode=PUBLIC_FILE)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write TUF metadata {path}: {exc}") from None
        return data

    def _stage(self, md: Metadata[Any]) -> None:
        self._write_md(self.staged_dir, f"{md.signed.type}.json", md)

    def _unstage(self, role: str) -> None:
        (self.staged_dir / f"{role}.json").unlink(missing_ok=True)

    def _online(self, role: str, root: Root) -> list[CryptoSigner]:
        if role == "director":
            keyids = [k.keyid for k in director_keys_from_root(root.to_dict()).keys]
        else:
            keyids = list(root.roles[role].keyids)
        return self.keys.signers(role, only=keyids)

    @staticmethod
    def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
        for signer in signers:
            md.sign(signer, append=True)

    def _sign_online(self, md: Metadata[Any], root: Root, extra: Sequence[Signer] = ()) -> bool:
        """Sign ``md`` with every online key of its role (and ``extra``): is the threshold met."""
        role = md.signed.type
        allowed = set(root.roles[role].keyids)
        signers = [*self._online(role, root), *(s for s in extra if s.public_key.keyid in allowed)]
        md.signatures.clear()
        self._sign(md, signers)
        return _verification(root, role, md)[0]

    def _require(self, md: Metadata[Any], root: Root) -> None:
        if not self._sign_online(md, root):
            role = md.signed.type
            raise RepositoryUnusable(
                f"the controller holds too few {role} keys to sign: "
                f"{_verification(root, role, md)[1]} (keys in {self.keys.role_dir(role)})"
            )

    def _publish_targets(self, md: Metadata[Targets], root: Root, now: datetime) -> None:
        data = self._write_md(self.metadata_dir, f"{md.signed.version}.targets.json", md)
        self._publish_snapshot(root, now, MetaFile.from_data(md.signed.version, data, ["sha256"]))

    def _publish_snapshot(self, root: Root, now: datetime, targets: MetaFile | None) -> None:
        """A new snapshot (pinning ``targets``, or the current targets again), then timestamp."""
        if targets is None:
            current = self._current_snapshot().signed.meta["targets.json"].version
            data = self.read(f"{current}.targets.json")
            targets = MetaFile.from_data(current, data, ["sha256"])
        try:
            version = self._current_snapshot().signed.version + 1
        except RepositoryUnusable:
            version = 1  # init: there is no snapshot yet
        md = Metadata(Snapshot(version=version, expires=now + self.expiries.snapshot))
        md.signed.meta = {"targets.json": targets}
        self._require(md, root)
        data = self._write_md(self.metadata_dir, f"{version}.snapshot.json", md)
        self._publish_timestamp(root, now, MetaFile.from_data(version, data, ["sha256"]))

    def _publish_timestamp(self, root: Root, now: datetime, snapshot: MetaFile) -> None:
        try:
            version = self._timestamp().signed.version + 1
        except RepositoryUnusable:
            version = 1
        md = Metadata(Timestamp(version=version, expires=now + self.expiries.timestamp))
        md.signed.snapshot_meta = snapshot
        self._require(md, root)
        self._write_md(self.metadata_dir, "timestamp.json", md)

    def _publish_root(self, md: Metadata[Root]) -> None:
        self._write_md(self.metadata_dir, f"{md.signed.version}.root.json", md)

    # --- init -------------------------------------------------------------------------------

    def init(
        self,
        now: datetime,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        targets_keys: int = 1,
        targets_threshold: int = 1,
        offline_dir: Path | None = None,
        offline_roles: Sequence[str] = (Root.type,),
        force: bool = False,
    ) -> InitResult:
        """A new repository: keys for every role, root v1, empty targets v1, snapshot, timestamp.

        With ``offline_dir``, the private keys of ``offline_roles`` (root, targets) are
        written there instead of the controller's store; they sign version 1 while in
        memory and never touch the controller's disk. ``force`` replaces an existing
        repository and its online keys: every device must then be given the new root.
        """
        counts = {
            Root.type: (root_keys, root_threshold),
            Targets.type: (targets_keys, targets_threshold),
        }
        for role, (count, threshold) in counts.items():
            _check_threshold(role, count, threshold)
        for role in offline_roles:
            if role not in OFFLINE_CAPABLE:
                raise InvalidInput(f"only root and targets keys can be kept offline, not {role!r}")
        with self._locked():
            if self._root_version() > 0 and not force:
                raise Conflict(
                    f"a TUF repository already exists in {self.path}: rotate keys with "
                    "`edgefleet keys rotate`, or pass --force to start over (every device "
                    "would then need the new root)"
                )
            if force:
                for folder in (self.metadata_dir, self.staged_dir, self.keys.root):
                    shutil.rmtree(folder, ignore_errors=True)
                self.metadata_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            offline = KeyStore(offline_dir) if offline_dir is not None else None
            signers: dict[str, list[CryptoSigner]] = {}
            offline_files: list[Path] = []
            for role in ROLES:
                count = counts.get(role, (1, 1))[0]
                store = offline if offline is not None and role in offline_roles else self.keys
                signers[role] = []
                for _ in range(count):
                    signer = store.generate(role)
                    signers[role].append(signer)
                    if store is offline:
                        offline_files.append(store.path(role, signer.public_key.keyid))
            root = Root(
                version=1,
                expires=now + self.expiries.root,
                consistent_snapshot=True,
                unrecognized_fields={
                    DIRECTOR_ROOT_FIELD: director_root_field(
                        [s.public_key for s in signers["director"]], 1
                    )
                },
            )
            for role in TOP_LEVEL_ROLES:
                for signer in signers[role]:
                    root.add_key(signer.public_key, role)
                root.roles[role].threshold = counts.get(role, (1, 1))[1]
            check_root(root)
            root_md = Metadata(root)
            self._sign(root_md, signers[Root.type])
            self._publish_root(root_md)
            targets_md = Metadata(Targets(version=1, expires=now + self.expiries.targets))
            self._sign(targets_md, signers[Targets.type])
            self._publish_targets(targets_md, root, now)
        log.info("initialised the TUF repository in %s", self.path)
        return InitResult(
            {role: tuple(s.public_key.keyid for s in signers[role]) for role in ROLES},
            tuple(offline_files),
        )

    # --- targets ----------------------------------------------------------------------------

    def add_target(self, target: TargetDescription, now: datetime) -> TargetsChange:
        return self.add_targets([target], now)

    def add_targets(self, targets: Sequence[TargetDescription], now: datetime) -> TargetsChange:
        """Add model artifacts as targets in one new targets version: signed or staged.

        A path already listed with the same length and hashes is left alone; with others
        it is a :class:`Conflict` (a registered artifact never changes). Each new target
        gets ``custom.release``, one more than the model's highest so far.
        """
        for target in targets:
            try:
                check_target_path(target.path)
            except TrustError as exc:
                raise InvalidInput(str(exc)) from None
        with self._locked():
            root = self.root()
            current = self._current_targets()
            staged = self._staged(Targets)
            if staged is not None and staged.signed.version <= current.signed.version:
                staged = None  # overtaken by a published version
            base = staged if staged is not None else _next(current, now, self.expiries.targets)
            listed = base.signed.targets
            releases = _releases(base.signed)
            added = []
            for target in targets:
                existing = listed.get(target.path)
                if existing is not None:
                    if existing.length != target.length or existing.hashes != target.hashes:
                        raise Conflict(f"target {target.path} is already signed with other content")
                    continue
                name = str(target.custom.get("name") or target.path.split("/", 1)[0])
                releases[name] = releases.get(name, 0) + 1
                listed[target.path] = _target_file(target, releases[name])
                added.append(target.path)
            if not added:
                signed = all(t.path in current.signed.targets for t in targets)
                version = current.signed.version if signed else base.signed.version
                return TargetsChange((), version, signed)
            base.signed.unrecognized_fields[RELEASES_FIELD] = releases
            base.signed.expires = now + self.expiries.targets
            if self._sign_online(base, root):
                self._publish_targets(base, root, now)
                self._unstage(Targets.type)
                return TargetsChange(tuple(added), base.signed.version, True)
            base.signatures.clear()  # the content changed: earlier signatures no longer hold
            self._stage(base)
        log.warning(
            "targets keys are offline: %d new target(s) staged in targets v%d; sign "
            "%s with `edgefleet keys sign` and import it",
            len(added), base.signed.version, self.staged_dir / "targets.json",
        )  # fmt: skip
        return TargetsChange(tuple(added), base.signed.version, False)

    def staged_targets(self, now: datetime) -> bytes:
        """The next targets metadata for offline signing: staged changes or a renewal.

        With nothing staged, the current targets with the next version and a fresh
        expiry are staged, so renewing offline targets takes the same steps.
        """
        with self._locked():
            current = self._current_targets()
            staged = self._staged(Targets)
            if staged is None or staged.signed.version <= current.signed.version:
                staged = _next(current, now, self.expiries.targets)
                self._stage(staged)
            return (self.staged_dir / "targets.json").read_bytes()

    def import_targets(self, data: bytes, now: datetime) -> int:
        """Publish targets metadata signed elsewhere; its version.

        It must be targets metadata signed by a threshold of the root's targets keys,
        newer than the published version, unexpired, with safe target paths.
        """
        md = _parse(data, Targets)
        with self._locked():
            root = self.root()
            ok, summary = _verification(root, Targets.type, md)
            if not ok:
                raise InvalidInput(f"the targets metadata is not signed well enough: {summary}")
            current = self._current_targets().signed.version
            if md.signed.version <= current:
                raise Conflict(
                    f"targets version {md.signed.version} is not newer than the published "
                    f"version {current}"
                )
            if md.signed.is_expired(now):
                raise InvalidInput(f"the targets metadata expired at {md.signed.expires}")
            for path in md.signed.targets:
                try:
                    check_target_path(path)
                except TrustError as exc:
                    raise InvalidInput(str(exc)) from None
            self._publish_targets(md, root, now)
            self._restage_after(md, now)
        log.info("imported targets v%d signed offline", md.signed.version)
        return md.signed.version

    def _restage_after(self, published: Metadata[Targets], now: datetime) -> None:
        """Targets staged after the admin fetched the file just imported wait for the next."""
        staged = self._staged(Targets)
        if staged is None:
            return
        pending = {
            path: entry
            for path, entry in staged.signed.targets.items()
            if path not in published.signed.targets
        }
        if not pending and staged.signed.version <= published.signed.version:
            self._unstage(Targets.type)
            return
        if staged.signed.version > published.signed.version:
            return  # already the next version: still to be signed
        following = _next(published, now, self.expiries.targets)
        following.signed.targets.update(pending)
        releases = _releases(following.signed)
        following.signed.unrecognized_fields[RELEASES_FIELD] = releases
        self._stage(following)

    # --- root -------------------------------------------------------------------------------

    def rotate(
        self,
        role: str,
        now: datetime,
        *,
        signers: Sequence[Signer] = (),
        keys: int | None = None,
        threshold: int | None = None,
        offline_dir: Path | None = None,
    ) -> RootChange:
        """Replace ``role``'s keys with new ones through a new root version.

        The new root must be signed by a threshold of the current root keys and of the
        new root's keys. Root keys are taken from the store and from ``signers`` (offline
        keys given on the command line). When both thresholds are met the root is
        published, with new snapshot and timestamp (and targets re-signed by new
        targets keys); otherwise it is staged for offline signing. New private keys go
        to ``offline_dir`` (root and targets only) or to the controller's store.
        Once a root is published, the store keeps only the keys it lists; publishing
        any root replaces a staged one.
        """
        check_role(role)
        if offline_dir is not None and role not in OFFLINE_CAPABLE:
            raise InvalidInput(f"{role} keys must stay on the controller: drop --offline-dir")
        with self._locked():
            current_md = self._load(f"{self._root_version()}.root.json", Root)
            current = current_md.signed
            if role == "director":
                director = director_keys_from_root(current.to_dict())
                old_count, old_threshold = len(director.keys), director.threshold
            else:
                old_count = len(current.roles[role].keyids)
                old_threshold = current.roles[role].threshold
            count = keys or old_count
            needed = threshold or min(old_threshold, count)
            _check_threshold(role, count, needed)

            new = Root.from_dict(copy.deepcopy(current.to_dict()))
            new.version = current.version + 1
            new.expires = now + self.expiries.root
            store = KeyStore(offline_dir) if offline_dir is not None else self.keys
            fresh = [store.generate(role) for _ in range(count)]
            if role == "director":
                new.unrecognized_fields[DIRECTOR_ROOT_FIELD] = director_root_field(
                    [s.public_key for s in fresh], needed
                )
            else:
                for keyid in list(new.roles[role].keyids):
                    new.revoke_key(keyid, role)
                for signer in fresh:
                    new.add_key(signer.public_key, role)
                new.roles[role].threshold = needed
            check_root(new)

            md = Metadata(new)
            root_ids = set(current.roles[Root.type].keyids) | set(new.roles[Root.type].keyids)
            root_signers: list[Signer] = [
                *self.keys.signers(Root.type, only=sorted(root_ids)),
                *(s for s in signers if s.public_key.keyid in root_ids),
                *(fresh if role == Root.type else []),
            ]
            self._sign(md, _unique(root_signers))
            ok, summary = _root_verification(current, md)
            change = RootChange(
                role,
                new.version,
                ok,
                tuple(s.public_key.keyid for s in fresh),
                tuple(store.path(role, s.public_key.keyid) for s in fresh),
            )
            if ok:
                self._publish_root(md)
                self._after_root(new, now, fresh)
                self._unstage(Root.type)
            else:
                self._stage(md)
                if role == Targets.type:  # the new keys are in hand: pre-sign targets for them
                    current_targets = self._current_targets()
                    targets = self._staged(Targets)
                    if targets is None or targets.signed.version <= current_targets.signed.version:
                        targets = _next(current_targets, now, self.expiries.targets)
                    targets.signatures.clear()
                    self._sign(targets, fresh)
                    self._stage(targets)
                change = replace(change, missing=summary)
        if ok:
            log.info("rotated the %s keys: root v%d published", role, new.version)
        else:
            log.warning("root v%d staged for offline signing (%s)", new.version, summary)
        return change

    def staged_root(self) -> bytes:
        """The staged next root, for offline signing; :class:`NotFound` when none is staged."""
        try:
            return (self.staged_dir / "root.json").read_bytes()
        except FileNotFoundError:
            raise NotFound("no root is staged: `edgefleet keys rotate` stages one") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read the staged root: {exc}") from None

    def import_root(self, data: bytes, now: datetime) -> int:
        """Publish a root signed elsewhere (a rotation finished offline); its version.

        The TUF rule: the next version, signed by a threshold of the current root's root
        keys and of its own. It must be unexpired, list distinct keys, name a director,
        and leave the controller able to sign snapshot, timestamp and desired states.
        """
        md = _parse(data, Root)
        new = md.signed
        with self._locked():
            current = self.root()
            if new.version != current.version + 1:
                raise Conflict(
                    f"root version {new.version} does not follow the current version "
                    f"{current.version}"
                )
            ok, summary = _root_verification(current, md)
            if not ok:
                raise InvalidInput(f"the root is not signed well enough: {summary}")
            if new.is_expired(now):
                raise InvalidInput(f"the root expired at {new.expires}")
            if not new.consistent_snapshot:
                raise InvalidInput("the root must keep consistent_snapshot on")
            check_root(new)
            for role in (Snapshot.type, Timestamp.type, "director"):
                online = self._online(role, new)
                needed = (
                    director_keys_from_root(new.to_dict()).threshold
                    if role == "director"
                    else new.roles[role].threshold
                )
                if len(online) < needed:
                    raise InvalidInput(
                        f"the controller holds {len(online)} of the {needed} {role} keys this "
                        "root requires: rotate online roles with `edgefleet keys rotate` on "
                        "the controller"
                    )
            self._publish_root(md)
            self._after_root(new, now, [])
            self._unstage(Root.type)
        log.info("imported root v%d signed offline", new.version)
        return new.version

    def _after_root(self, new: Root, now: datetime, fresh: Sequence[CryptoSigner]) -> None:
        """After a new root: drop keys it does not list, re-sign what its keys must sign.

        Keys the store holds but the new root does not list are retired ones, or were
        made for a staged root that this one replaces: either way they never sign again.
        """
        for role in ROLES:
            listed = (
                {k.keyid for k in director_keys_from_root(new.to_dict()).keys}
                if role == "director"
                else set(new.roles[role].keyids)
            )
            for keyid in self.keys.keyids(role):
                if keyid not in listed:
                    self.keys.remove(role, keyid)
        current = self._current_targets()
        targets_changed = not _verification(new, Targets.type, current)[0]
        if targets_changed:
            staged = self._staged(Targets)
            if (
                staged is not None
                and staged.signed.version > current.signed.version
                and _verification(new, Targets.type, staged)[0]
            ):
                self._publish_targets(staged, new, now)
                self._unstage(Targets.type)
                return
            renewed = _next(current, now, self.expiries.targets)
            if self._sign_online(renewed, new, fresh):
                self._publish_targets(renewed, new, now)
                return
            log.warning(
                "the new root's targets keys are not on the controller: sign the staged "
                "targets offline and import them, devices refuse the old ones"
            )
        self._publish_snapshot(new, now, None)

    # --- refresh ----------------------------------------------------------------------------

    def refresh(self, now: datetime) -> list[str]:
        """Re-sign what is close to expiry with the online keys; the roles re-signed.

        Called periodically by the controller so devices never see expired metadata.
        Root and targets are renewed here only when their keys are online; otherwise a
        warning says when they expire.
        """
        renewed: list[str] = []
        with self._locked():
            root_md = self._load(f"{self._root_version()}.root.json", Root)
            root = root_md.signed
            if self._due(root, now):
                new = Root.from_dict(copy.deepcopy(root.to_dict()))
                new.version += 1
                new.expires = now + self.expiries.root
                md = Metadata(new)
                self._sign(md, self._online(Root.type, root))
                if _root_verification(root, md)[0]:
                    self._publish_root(md)
                    root = new
                    renewed.append(Root.type)
                elif root.expires - now <= OFFLINE_WARNING:
                    log.warning("root expires at %s; its keys are offline: renew it", root.expires)
            targets = self._current_targets()
            if self._due(targets.signed, now):
                next_targets = _next(targets, now, self.expiries.targets)
                if self._sign_online(next_targets, root):
                    self._publish_targets(next_targets, root, now)
                    return [*renewed, Targets.type, Snapshot.type, Timestamp.type]
                if targets.signed.expires - now <= OFFLINE_WARNING:
                    log.warning(
                        "targets expire at %s and their keys are offline: sign the staged "
                        "targets (`edgefleet keys staged`) and import them",
                        targets.signed.expires,
                    )
            if self._due(self._current_snapshot().signed, now):
                self._publish_snapshot(root, now, None)
                return [*renewed, Snapshot.type, Timestamp.type]
            timestamp = self._timestamp()
            if self._due(timestamp.signed, now) or Root.type in renewed:
                self._publish_timestamp(root, now, timestamp.signed.snapshot_meta)
                renewed.append(Timestamp.type)
        return renewed

    def _due(self, signed: Signed, now: datetime) -> bool:
        lifetime = self.expiries.of(signed.type)
        return signed.expires - now <= lifetime * self.expiries.renew_fraction


def _check_threshold(role: str, count: int, threshold: int) -> None:
    if count < 1 or threshold < 1 or threshold > count:
        raise InvalidInput(f"{role}: need 1 <= threshold ({threshold}) <= keys ({count})")


def _next(current: Metadata[Targets], now: datetime, lifetime: timedelta) -> Metadata[Targets]:
    """An unsigned copy of ``current`` with the next version and a fresh expiry."""
    signed = Targets.from_dict(copy.deepcopy(current.signed.to_dict()))
    signed.version += 1
    signed.expires = now + lifetime
    return Metadata(signed)


def _unique(signers: Sequence[Signer]) -> list[Signer]:
    seen: set[str] = set()
    result = []
    for signer in signers:
        if signer.public_key.keyid not in seen:
            seen.add(signer.public_key.keyid)
            result.append(signer)
    return result
