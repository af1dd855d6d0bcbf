"""The device's TUF client against a real HTTP server serving a real repository's metadata.

The metadata comes from the controller's :class:`TufRepository`; hostile variants are
made with python-tuf's metadata API and the repository's own keys, the way a
compromised server holding some keys (or none) could make them. Every hostile case
checks the typed error and that the client's trusted state did not move: the files it
persisted keep their versions and lookups answer from the last verified view.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from agent.update.tuf_client import (
    TrustRootMissing,
    TufClient,
    TufError,
    TufRejected,
    TufUnavailable,
)
from fleet.registry.keys import KeyStore
from fleet.registry.repository import TufRepository
from fleet.registry.targets import TargetDescription, describe_target
from models.director import DIRECTOR_ROOT_FIELD, director_root_field
from scripts.servers import free_port

PREFIX = "/api/v1/tuf/"
A = "gemma3-270m/1.0/Q4_K_M.gguf"
B = "gemma3-270m/1.1/Q4_K_M.gguf"


class MetadataServer(ThreadingHTTPServer):
    """Serves ``files`` under /api/v1/tuf/; 404 for anything else."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.files: dict[str, bytes] = {}
        self.status: int | None = None  # answer every request with this instead
        self.auth: str | None = None  # the Authorization header required, when set
        self.seen_auth: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{PREFIX}"


class _Handler(BaseHTTPRequestHandler):
    server: MetadataServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        srv.seen_auth.append(self.headers.get("Authorization"))
        if srv.status is not None:
            self._send(srv.status)
        elif srv.auth is not None and self.headers.get("Authorization") != srv.auth:
            self._send(401)
        elif not self.path.startswith(PREFIX) or self.path[len(PREFIX) :] not in srv.files:
            self._send(404)
        else:
            self._send(200, srv.files[self.path[len(PREFIX) :]])


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    srv = MetadataServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def now() -> datetime:
    return datetime.now(UTC)  # ngclient checks expiry against the real clock


def describe(path: str, data: bytes) -> TargetDescription:
    name, version, rest = path.split("/")
    return describe_target(
        name=name,
        version=version,
        variant=rest.split(".")[0],
        fmt="gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        metadata={"ram_bytes": 1 << 30},
    )


@dataclass
class World:
    """A repository, the server publishing it, and a device's client trusting root v1."""

    repo: TufRepository
    server: MetadataServer
    client: TufClient
    device_dir: Path

    def publish(self) -> None:
        """Serve exactly what the repository has written."""
        self.server.files = {p.name: p.read_bytes() for p in self.repo.metadata_dir.iterdir()}

    def served(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes(self.server.files[name])

    def signers(self, role: str) -> list[CryptoSigner]:
        return self.repo.keys.signers(role)

    def serve(self, name: str, md: Metadata[Any], signers: list[CryptoSigner] | None) -> bytes:
        """Serve ``md`` as ``name``, re-signed by ``signers`` (None: as it is)."""
        if signers is not None:
            md.signatures.clear()
            for signer in signers:
                md.sign(signer, append=True)
        data = md.to_bytes()
        self.server.files[name] = data
        return data

    def trusted(self) -> dict[str, Any]:
        """What the client has persisted as verified: versions, and the root history."""
        state: dict[str, Any] = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            path = self.device_dir / f"{role}.json"
            state[role] = Metadata.from_bytes(path.read_bytes()).signed.version
        state["root_history"] = sorted(p.name for p in (self.device_dir / "root_history").iterdir())
        return state

    def forge_snapshot(
        self, targets_name: str, *, version: int | None = None, expires: datetime | None = None
    ) -> str:
        """A snapshot pinning ``targets_name`` (then a timestamp pinning it)."""
        current = self.served("timestamp.json").signed.snapshot_meta.version
        data = self.server.files[targets_name]
        pin = MetaFile.from_data(int(targets_name.split(".")[0]), data, ["sha256"])
        snapshot = Snapshot(
            version=version or current + 1, expires=expires or now() + timedelta(days=7)
        )
        snapshot.meta = {"targets.json": pin}
        name = f"{snapshot.version}.snapshot.json"
        self.serve(name, Metadata(snapshot), self.signers("snapshot"))
        self.forge_timestamp(name)
        return name

    def forge_timestamp(
        self,
        snapshot_name: str,
        *,
        version: int | None = None,
        expires: datetime | None = None,
        hashes: bool = True,
    ) -> None:
        current = self.served("timestamp.json").signed.version
        data = self.server.files[snapshot_name]
        pin_version = int(snapshot_name.split(".")[0])
        pin = MetaFile.from_data(pin_version, data, ["sha256"]) if hashes else MetaFile(pin_version)
        timestamp = Timestamp(
            version=version or current + 1,
            expires=expires or now() + timedelta(days=1),
            snapshot_meta=pin,
        )
        self.serve("timestamp.json", Metadata(timestamp), self.signers("timestamp"))

    def forge_targets(self, md: Metadata[Targets], signers: list[CryptoSigner] | None) -> None:
        """Serve ``md`` (signed by ``signers``) and pin it with new snapshot and timestamp."""
        name = f"{md.signed.version}.targets.json"
        self.serve(name, md, signers)
        self.forge_snapshot(name)

    def next_targets(self, path: str = B) -> Metadata[Targets]:
        """The served targets plus ``path``, one version up, unsigned."""
        version = self.served(self.served_snapshot()).signed.meta["targets.json"].version
        md: Metadata[Targets] = self.served(f"{version}.targets.json")
        md.signed.version += 1
        md.signed.targets[path] = describe_target_file(path)
        return md

    def served_snapshot(self) -> str:
        return f"{self.served('timestamp.json').signed.snapshot_meta.version}.snapshot.json"


def describe_target_file(path: str) -> TargetFile:
    return TargetFile.from_data(path, b"GGUF" + path.encode(), ["sha256"])


def make_world(tmp_path: Path, server: MetadataServer, **init: Any) -> Iterator[World]:
    repo = TufRepository(tmp_path / "tuf", KeyStore(tmp_path / "keys"))
    repo.init(now(), **init)
    repo.add_target(describe(A, b"GGUF a"), now())
    device_dir = tmp_path / "device" / "tuf"
    client = TufClient(device_dir, server.url, auth=None, timeout_s=5.0)
    world = World(repo, server, client, device_dir)
    world.publish()
    assert client.install_root(repo.read("1.root.json"))
    client.refresh()
    assert client.target(A).length == len(b"GGUF a")
    try:
        yield world
    finally:
        client.close()


@pytest.fixture
def world(tmp_path: Path, server: MetadataServer) -> Iterator[World]:
    yield from make_world(tmp_path, server)


@pytest.fixture
def world_2_of_3(tmp_path: Path, server: MetadataServer) -> Iterator[World]:
    yield from make_world(tmp_path, server, targets_keys=3, targets_threshold=2)


ORDER = ["root", "timestamp", "snapshot", "targets"]  # the order a client loads them in


def rejected(world: World, kind: str, cause: type[BaseException] | None, *, at: str) -> TufRejected:
    """Refresh must fail with ``kind`` at role ``at``: it and what follows must not move.

    Roles loaded before ``at`` may move when they were properly signed (an attacker with
    the online keys makes a valid timestamp): TUF keeps them for rollback protection.
    Lookups keep answering from the last completely verified view.
    """
    before = world.trusted()
    with pytest.raises(TufRejected) as info:
        world.client.refresh()
    assert info.value.kind == kind, info.value
    assert f"({kind})" in str(info.value)
    if cause is not None:
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    after = world.trusted()
    for role in ["root_history", *ORDER[ORDER.index(at) :]]:
        assert after[role] == before[role], role
    assert world.client.find(B) is None
    assert world.client.target(A).length == len(b"GGUF a")
    return info.value


# --- the normal path ------------------------------------------------------------------------


def test_refresh_follows_new_targets_with_their_custom_fields(world: World) -> None:
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    assert world.client.find(B) is None  # not until a refresh
    world.client.refresh()
    entry = world.client.target(B)
    assert entry.length == len(b"GGUF b")
    assert entry.custom["release"] == 2
    assert entry.custom["ram_bytes"] == 1 << 30
    assert world.trusted()["targets"] == 3


def test_threshold_two_of_three_accepts_two_signatures(world_2_of_3: World) -> None:
    world = world_2_of_3
    md = world.next_targets()
    world.forge_targets(md, world.signers("targets")[:2])
    world.client.refresh()
    assert world.client.find(B) is not None


def test_a_legitimate_root_rotation_is_followed(world: World) -> None:
    old_director = world.client.director_keys()
    world.repo.rotate("root", now(), keys=2, threshold=2)
    change = world.repo.rotate("director", now())
    world.publish()
    world.client.refresh()
    assert world.trusted()["root"] == 3
    assert world.trusted()["root_history"] == ["1.root.json", "2.root.json", "3.root.json"]
    director = world.client.director_keys()
    assert [k.keyid for k in director.keys] == list(change.keyids)
    assert director.keys != old_director.keys
    assert world.client.find(A) is not None


def test_device_credentials_are_sent(world: World, server: MetadataServer) -> None:
    auth = ("dev-0123456789abcdef", "broker-password")
    server.auth = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    with TufClient(world.device_dir, server.url, auth=auth, timeout_s=5.0) as client:
        client.refresh()
        assert client.find(A) is not None
    with pytest.raises(TufUnavailable, match="HTTP 401"):
        world.client.refresh()  # no credentials


# --- hostile metadata -----------------------------------------------------------------------


def test_unsigned_metadata_is_rejected(world: World) -> None:
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    world.serve("timestamp.json", world.served("timestamp.json"), signers=[])
    rejected(world, "signature", exceptions.UnsignedMetadataError, at="timestamp")


def test_metadata_signed_by_a_key_the_root_does_not_name_is_rejected(world: World) -> None:
    world.forge_targets(world.next_targets(), [CryptoSigner.generate_ed25519()])
    rejected(world, "signature", exceptions.UnsignedMetadataError, at="targets")


def test_targets_below_the_threshold_are_rejected(world_2_of_3: World) -> None:
    world = world_2_of_3
    world.forge_targets(world.next_targets(), world.signers("targets")[:1])
    error = rejected(world, "signature", exceptions.UnsignedMetadataError, at="targets")
    assert "1/2" in str(error)


def test_one_signature_listed_twice_does_not_count_twice(world_2_of_3: World) -> None:
    world = world_2_of_3
    md = world.next_targets()
    md.sign(world.signers("targets")[0])
    doubled = json.loads(md.to_bytes())
    doubled["signatures"].append(doubled["signatures"][0])
    name = f"{md.signed.version}.targets.json"
    world.server.files[name] = json.dumps(doubled).encode()
    world.forge_snapshot(name)
    rejected(world, "malformed", DeserializationError, at="targets")


def test_one_signature_under_two_key_ids_does_not_count_twice(world_2_of_3: World) -> None:
    world = world_2_of_3
    md = world.next_targets()
    signature = md.sign(world.signers("targets")[0])
    other = next(k for k in world.repo.root().roles["targets"].keyids if k != signature.keyid)
    copied = json.loads(md.to_bytes())
    copied["signatures"].append({"keyid": other, "sig": signature.signature})
    name = f"{md.signed.version}.targets.json"
    world.server.files[name] = json.dumps(copied).encode()
    world.forge_snapshot(name)
    rejected(world, "signature", exceptions.UnsignedMetadataError, at="targets")


def test_a_root_listing_one_key_twice_is_refused(world: World) -> None:
    """Signed by the real root key, yet one targets key would meet a threshold of 2."""
    root: Metadata[Root] = world.served("1.root.json")
    new = root.signed
    key = new.keys[new.roles["targets"].keyids[0]]
    twin = type(key).from_dict("e" * 64, dict(key.to_dict()))
    new.keys[twin.keyid] = twin
    new.roles["targets"].keyids.append(twin.keyid)
    new.roles["targets"].threshold = 2
    new.version = 2
    world.serve("2.root.json", root, world.signers("root"))
    md = world.next_targets()
    signature = md.sign(world.signers("targets")[0])
    twice = json.loads(md.to_bytes())
    twice["signatures"].append({"keyid": twin.keyid, "sig": signature.signature})
    name = f"{md.signed.version}.targets.json"
    world.server.files[name] = json.dumps(twice).encode()
    world.forge_snapshot(name)
    rejected(world, "duplicate-key", None, at="root")
    assert world.client.director_keys().threshold == 1  # root v1 still rules


def test_a_rollback_to_an_older_timestamp_is_rejected(world: World) -> None:
    old = world.server.files["timestamp.json"]
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    world.client.refresh()
    before = world.trusted()
    world.server.files["timestamp.json"] = old
    with pytest.raises(TufRejected) as info:
        world.client.refresh()
    assert info.value.kind == "version"
    assert isinstance(info.value.__cause__, exceptions.BadVersionNumberError)
    assert world.trusted() == before
    assert world.client.find(B) is not None  # the newer verified view stays


def test_a_timestamp_pinning_an_older_snapshot_is_rejected(world: World) -> None:
    old_snapshot = world.served_snapshot()
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    world.client.refresh()
    before = world.trusted()
    world.forge_timestamp(old_snapshot)
    with pytest.raises(TufRejected) as info:
        world.client.refresh()
    assert info.value.kind == "version"
    assert "snapshot version must be >=" in str(info.value)
    assert world.trusted() == before


def test_a_snapshot_pinning_older_targets_is_rejected(world: World) -> None:
    world.forge_snapshot("1.targets.json")  # the targets before A was added
    rejected(world, "version", exceptions.BadVersionNumberError, at="snapshot")


def test_same_timestamp_version_with_other_content_is_rejected(world: World) -> None:
    trusted = world.served("timestamp.json").signed.version
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    world.forge_timestamp(world.served_snapshot(), version=trusted)  # signed, same version
    rejected(world, "equivocation", None, at="timestamp")


def test_same_snapshot_version_with_other_content_is_rejected(world: World) -> None:
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    name = world.served_snapshot()
    other: Metadata[Snapshot] = world.served(name)
    other.signed.expires += timedelta(seconds=1)  # same version, other (signed) content
    world.serve(name, other, world.signers("snapshot"))
    rejected(world, "mismatch", exceptions.LengthOrHashMismatchError, at="snapshot")


def test_targets_not_matching_the_snapshot_pin_are_rejected(world: World) -> None:
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    version = world.served(world.served_snapshot()).signed.meta["targets.json"].version
    swapped = world.next_targets(path="evil/1/x.gguf")
    swapped.signed.version = version  # what the snapshot pins, but other content
    world.serve(f"{version}.targets.json", swapped, world.signers("targets"))
    rejected(world, "mismatch", exceptions.LengthOrHashMismatchError, at="targets")


def test_a_snapshot_of_another_version_than_pinned_is_rejected(world: World) -> None:
    """Mix-and-match without hashes: the version inside must be the version pinned."""
    world.repo.add_target(describe(B, b"GGUF b"), now())
    world.publish()
    pinned = world.served("timestamp.json").signed.snapshot_meta.version
    world.server.files[f"{pinned + 1}.snapshot.json"] = world.server.files["1.snapshot.json"]
    world.forge_timestamp(f"{pinned + 1}.snapshot.json", hashes=False)
    rejected(world, "version", exceptions.BadVersionNumberError, at="snapshot")


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_is_rejected(world: World, role: str) -> None:
    past = now() - timedelta(hours=1)
    if role == "targets":
        md = world.next_targets()
        md.signed.expires = past
        world.forge_targets(md, world.signers("targets"))
    else:
        world.forge_targets(world.next_targets(), world.signers("targets"))
        if role == "snapshot":
            targets = world.served(world.served_snapshot()).signed.meta["targets.json"]
            world.forge_snapshot(f"{targets.version}.targets.json", expires=past)
        else:
            world.forge_timestamp(world.served_snapshot(), expires=past)
    error = rejected(world, "expired", exceptions.ExpiredMetadataError, at=role)
    assert role in str(error)


def test_root_rotation_without_the_old_keys_is_rejected(world: World) -> None:
    intruder = CryptoSigner.generate_ed25519()
    root: Metadata[Root] = world.served("1.root.json")
    new = root.signed
    for keyid in list(new.roles["root"].keyids):
        new.revoke_key(keyid, "root")
    new.add_key(intruder.public_key, "root")
    new.unrecognized_fields[DIRECTOR_ROOT_FIELD] = director_root_field([intruder.public_key], 1)
    new.version = 2
    world.serve("2.root.json", root, [intruder])  # only the new root key signs
    rejected(world, "signature", exceptions.UnsignedMetadataError, at="root")
    assert world.trusted()["root_history"] == ["1.root.json"]
    director = world.client.director_keys()
    assert intruder.public_key.keyid not in [k.keyid for k in director.keys]


def test_root_rotation_without_the_new_keys_is_rejected(world: World) -> None:
    newcomer = CryptoSigner.generate_ed25519()
    root: Metadata[Root] = world.served("1.root.json")
    for keyid in list(root.signed.roles["root"].keyids):
        root.signed.revoke_key(keyid, "root")
    root.signed.add_key(newcomer.public_key, "root")
    root.signed.version = 2
    world.serve("2.root.json", root, world.signers("root"))  # old keys only
    rejected(world, "signature", exceptions.UnsignedMetadataError, at="root")


def test_a_root_skipping_a_version_is_rejected(world: World) -> None:
    root: Metadata[Root] = world.served("1.root.json")
    root.signed.version = 3
    world.serve("2.root.json", root, world.signers("root"))
    rejected(world, "version", exceptions.BadVersionNumberError, at="root")


def test_an_endless_timestamp_is_cut_off(world: World) -> None:
    world.server.files["timestamp.json"] = b"{" + b" " * 100_000
    rejected(world, "mismatch", exceptions.DownloadLengthMismatchError, at="timestamp")


# --- lookups --------------------------------------------------------------------------------


def test_unknown_targets_and_unsafe_paths_are_rejected(world: World) -> None:
    with pytest.raises(TufRejected) as info:
        world.client.target("gemma3-270m/9.9/none.gguf")
    assert info.value.kind == "unknown-target"
    for path in ["../etc/passwd", "/abs/x.gguf", "a/%2e%2e/x", "a\\b"]:
        with pytest.raises(TufRejected) as unsafe:
            world.client.target(path)
        assert unsafe.value.kind == "unsafe-path"


def test_a_verified_view_past_its_expiry_is_not_used(world: World, server: MetadataServer) -> None:
    later = now() + timedelta(days=2)  # past the timestamp's one day
    with TufClient(
        world.device_dir, server.url, auth=None, timeout_s=5.0, clock=lambda: later
    ) as c:
        c.refresh()
        with pytest.raises(TufRejected) as info:
            c.target(A)
        assert info.value.kind == "expired"


# --- transport ------------------------------------------------------------------------------


def test_server_errors_are_transient_and_keep_the_view(
    world: World, server: MetadataServer
) -> None:
    server.status = 503
    with pytest.raises(TufUnavailable, match="HTTP 503"):
        world.client.refresh()
    assert world.client.find(A) is not None
    server.status = None
    del server.files["timestamp.json"]
    with pytest.raises(TufUnavailable, match="HTTP 404"):
        world.client.refresh()


def test_an_unreachable_controller_is_transient(tmp_path: Path, world: World) -> None:
    url = f"http://127.0.0.1:{free_port()}{PREFIX}"
    with TufClient(world.device_dir, url, auth=None, timeout_s=2.0) as client:
        with pytest.raises(TufUnavailable) as info:
            client.refresh()
        assert isinstance(info.value.__cause__, exceptions.DownloadError)
        assert isinstance(info.value, TufError)


# --- the trust root -------------------------------------------------------------------------


def test_no_root_fails_closed(tmp_path: Path, server: MetadataServer) -> None:
    with TufClient(tmp_path / "none", server.url, auth=None, timeout_s=2.0) as client:
        for call in (client.refresh, client.director_keys, lambda: client.target(A)):
            with pytest.raises(TrustRootMissing):
                call()
    assert server.seen_auth == []  # nothing was even fetched


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b'{"signed": {}, "signatures": []}'],
    ids=["empty", "junk", "empty-root"],
)
def test_an_unreadable_root_fails_closed(world: World, content: bytes) -> None:
    root = world.device_dir / "root.json"
    root.unlink()
    root.write_bytes(content)
    with pytest.raises(TrustRootMissing) as info:
        world.client.refresh()
    assert info.value.kind == "trust-root"
    with pytest.raises(TrustRootMissing):
        world.client.director_keys()


def test_a_root_that_does_not_verify_itself_fails_closed(world: World) -> None:
    root: Metadata[Root] = Metadata.from_bytes((world.device_dir / "root.json").read_bytes())
    root.signed.expires += timedelta(days=1)  # signatures no longer match
    path = world.device_dir / "root.json"
    path.unlink()
    path.write_bytes(root.to_bytes())
    with pytest.raises(TrustRootMissing):
        world.client.refresh()


def test_install_root_trusts_on_first_use_only(tmp_path: Path, world: World) -> None:
    fresh = tmp_path / "fresh"
    with TufClient(fresh, world.server.url, auth=None, timeout_s=2.0) as client:
        for bad, kind in [
            (b"garbage", "malformed"),
            (world.server.files["timestamp.json"], "malformed"),  # not a root
        ]:
            with pytest.raises(TufRejected) as info:
                client.install_root(bad)
            assert info.value.kind == kind
            assert not client.has_root()
        unsigned: Metadata[Root] = world.served("1.root.json")
        unsigned.signatures.clear()
        with pytest.raises(TufRejected) as info:
            client.install_root(unsigned.to_bytes())
        assert info.value.kind == "signature"
        assert not client.has_root()
        assert client.install_root(world.server.files["1.root.json"]) is True
        other = TufRepository(tmp_path / "other", KeyStore(tmp_path / "other-keys"))
        other.init(now())
        assert client.install_root(other.root_json()) is False  # the first root stays
        client.refresh()
        assert client.find(A) is not None
