"""The controller's TUF repository, its key store, its API routes and the ``keys`` CLI.

Repository tests need no database; each checks the metadata it wrote with python-tuf's
own verification (``Root.verify_delegate``, hashes pinned by snapshot and timestamp),
not with the repository's code. API tests run on SQLite and PostgreSQL (``api``).
"""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from typer.testing import CliRunner

from fleet.app import create_app, open_repository
from fleet.cli import app as cli_app
from fleet.config import FleetSettings
from fleet.errors import Conflict, InvalidInput, NotFound
from fleet.registry.keys import KeyStore, load_signer
from fleet.registry.repository import Expiries, TufRepository, check_root
from fleet.registry.targets import TargetDescription, describe_target
from models.director import DIRECTOR_ROOT_FIELD, director_keys_from_root
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN_TOKEN, START, Clock, enroll, error
from tests.fleet.test_registry import GGUF, basic, sha, uploaded

NOW = START
runner = CliRunner()


def target(
    name: str = "gemma3-270m", version: str = "1.0", data: bytes = GGUF
) -> TargetDescription:
    return describe_target(
        name=name,
        version=version,
        variant="Q4_K_M",
        fmt="gguf",
        sha256=sha(data),
        size_bytes=len(data),
        metadata={"ram_bytes": 400_000_000, "runtime": {"extra": {"temperature": 0.7}}},
    )


def new_repo(tmp_path: Path, **init: Any) -> TufRepository:
    repo = TufRepository(tmp_path / "tuf", KeyStore(tmp_path / "keys"))
    repo.init(NOW, **init)
    return repo


def load(repo: TufRepository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes(repo.read(name))


def check_chain(repo: TufRepository) -> dict[str, Metadata[Any]]:
    """What a client checks, done with python-tuf directly: signatures and pinned hashes."""
    root: Metadata[Root] = load(repo, "root.json")
    root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    timestamp: Metadata[Timestamp] = load(repo, "timestamp.json")
    root.signed.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)
    pinned = timestamp.signed.snapshot_meta
    snapshot_bytes = repo.read(f"{pinned.version}.snapshot.json")
    pinned.verify_length_and_hashes(snapshot_bytes)
    snapshot: Metadata[Snapshot] = Metadata.from_bytes(snapshot_bytes)
    root.signed.verify_delegate(Snapshot.type, snapshot.signed_bytes, snapshot.signatures)
    targets_meta = snapshot.signed.meta["targets.json"]
    targets_bytes = repo.read(f"{targets_meta.version}.targets.json")
    targets_meta.verify_length_and_hashes(targets_bytes)
    targets: Metadata[Targets] = Metadata.from_bytes(targets_bytes)
    root.signed.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
    return {"root": root, "timestamp": timestamp, "snapshot": snapshot, "targets": targets}


# --- init and keys --------------------------------------------------------------------------


def test_init_writes_a_verifiable_consistent_snapshot_repository(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    chain = check_chain(repo)
    root: Root = chain["root"].signed
    assert root.consistent_snapshot is True
    assert root.expires == NOW.replace(microsecond=0) + timedelta(days=365)
    assert chain["timestamp"].signed.expires == NOW.replace(microsecond=0) + timedelta(days=1)
    assert chain["snapshot"].signed.expires == NOW.replace(microsecond=0) + timedelta(days=7)
    assert chain["targets"].signed.expires == NOW.replace(microsecond=0) + timedelta(days=90)
    # Every role has its own key, and the director's keys ride in root.
    keyids = [tuple(root.roles[r].keyids) for r in ("root", "targets", "snapshot", "timestamp")]
    assert len({k for ids in keyids for k in ids}) == 4
    director = director_keys_from_root(root.to_dict())
    assert [k.keyid for k in director.keys] == [s.public_key.keyid for s in repo.director_signers()]
    assert root.unrecognized_fields[DIRECTOR_ROOT_FIELD]["threshold"] == 1
    assert repo.root_json() == repo.read("1.root.json")


def test_private_keys_are_private_files_in_private_folders(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    for role in ("root", "targets", "snapshot", "timestamp", "director"):
        folder = repo.keys.role_dir(role)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        (key,) = folder.iterdir()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert load_signer(key).public_key.keyid == key.stem  # named by key id


def test_the_director_field_round_trips_and_stays_signed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    raw = repo.root_json()
    root: Metadata[Root] = Metadata.from_bytes(raw)
    assert DIRECTOR_ROOT_FIELD in json.loads(raw)["signed"]
    again: Metadata[Root] = Metadata.from_bytes(root.to_bytes())
    again.signed.verify_delegate(Root.type, again.signed_bytes, again.signatures)
    # Changing the director keys breaks the root's signature: they are signed content.
    again.signed.unrecognized_fields[DIRECTOR_ROOT_FIELD]["threshold"] = 2
    with pytest.raises(UnsignedMetadataError):
        again.signed.verify_delegate(Root.type, again.signed_bytes, again.signatures)


def test_init_twice_is_refused_unless_forced(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    old_root = repo.root_json()
    with pytest.raises(Conflict, match="already exists"):
        repo.init(NOW)
    assert repo.root_json() == old_root
    repo.init(NOW, force=True)
    assert repo.root_json() != old_root
    assert len(repo.keys.keyids("root")) == 1  # the old keys went with the old repository


@pytest.mark.parametrize(
    ("keys", "threshold"), [(1, 2), (0, 1), (3, 0)], ids=["above", "no-keys", "zero"]
)
def test_impossible_thresholds_are_refused(tmp_path: Path, keys: int, threshold: int) -> None:
    repo = TufRepository(tmp_path / "tuf", KeyStore(tmp_path / "keys"))
    with pytest.raises(InvalidInput, match="threshold"):
        repo.init(NOW, root_keys=keys, root_threshold=threshold)
    assert not repo.exists()


def test_thresholds_above_one(tmp_path: Path) -> None:
    repo = new_repo(tmp_path, root_keys=3, root_threshold=2, targets_keys=3, targets_threshold=2)
    chain = check_chain(repo)
    root: Root = chain["root"].signed
    assert (len(root.roles["root"].keyids), root.roles["root"].threshold) == (3, 2)
    assert (len(root.roles["targets"].keyids), root.roles["targets"].threshold) == (3, 2)
    assert len(chain["root"].signatures) == 3
    # With two of the three targets keys online, new targets still publish...
    repo.keys.remove("targets", root.roles["targets"].keyids[0])
    change = repo.add_target(target(), NOW)
    assert change.published
    signed = check_chain(repo)["targets"]
    assert len(signed.signatures) == 2
    # ...with one, they cannot: they are staged for offline signing instead.
    repo.keys.remove("targets", root.roles["targets"].keyids[1])
    staged = repo.add_target(target(version="1.1", data=GGUF + b"1"), NOW)
    assert (staged.published, staged.version) == (False, 3)
    assert "gemma3-270m/1.1/Q4_K_M.gguf" not in repo.targets()
    assert repo.staged_targets_version() == 3


def test_check_root_refuses_a_key_listed_twice(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    root = repo.root()
    key = root.keys[root.roles["targets"].keyids[0]]
    twin = type(key).from_dict("f" * 64, dict(key.to_dict()))
    root.keys[twin.keyid] = twin
    root.roles["targets"].keyids.append(twin.keyid)
    root.roles["targets"].threshold = 2
    with pytest.raises(InvalidInput, match="one key under two key ids"):
        check_root(root)


# --- targets --------------------------------------------------------------------------------


def test_add_target_signs_length_hash_custom_and_a_release_counter(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    first = repo.add_target(target(), NOW)
    assert (first.added, first.version, first.published) == (
        ("gemma3-270m/1.0/Q4_K_M.gguf",),
        2,
        True,
    )
    repo.add_target(target(version="1.1", data=GGUF + b"1"), NOW)
    repo.add_target(target(name="minilm", data=GGUF + b"m"), NOW)
    chain = check_chain(repo)
    listed = chain["targets"].signed.targets
    entry = listed["gemma3-270m/1.0/Q4_K_M.gguf"]
    assert (entry.length, entry.hashes) == (len(GGUF), {"sha256": sha(GGUF)})
    assert entry.custom["variant"] == "Q4_K_M"
    assert entry.custom["ram_bytes"] == 400_000_000  # hardware requirements
    assert entry.custom["runtime"]["extra"]["temperature"] == "0.7"  # canonical JSON: no floats
    releases = {path: t.custom["release"] for path, t in listed.items()}
    assert releases == {
        "gemma3-270m/1.0/Q4_K_M.gguf": 1,
        "gemma3-270m/1.1/Q4_K_M.gguf": 2,
        "minilm/1.0/Q4_K_M.gguf": 1,
    }
    assert chain["targets"].signed.version == 4
    assert chain["snapshot"].signed.version == 4
    assert chain["timestamp"].signed.version == 4


def test_add_target_is_idempotent_and_refuses_other_content(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    repo.add_target(target(), NOW)
    again = repo.add_target(target(), NOW)
    assert (again.added, again.version, again.published) == ((), 2, True)
    assert load(repo, "timestamp.json").signed.version == 2  # nothing re-signed
    with pytest.raises(Conflict, match="other content"):
        repo.add_target(target(data=GGUF + b"other"), NOW)
    with pytest.raises(InvalidInput, match="target path"):
        repo.add_target(TargetDescription("../etc/passwd", 1, {"sha256": "0" * 64}), NOW)


def test_release_counters_never_go_back(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    repo.add_target(target(version="1"), NOW)
    repo.add_target(target(version="2", data=GGUF + b"2"), NOW)
    # An offline signer may drop a target; the counter still grows past it.
    signer = repo.keys.signers("targets")[0]
    md: Metadata[Targets] = load(repo, "targets.json")
    del md.signed.targets["gemma3-270m/2/Q4_K_M.gguf"]
    md.signed.version += 1
    md.sign(signer)
    repo.import_targets(md.to_bytes(), NOW)
    repo.add_target(target(version="3", data=GGUF + b"3"), NOW)
    assert repo.targets()["gemma3-270m/3/Q4_K_M.gguf"].custom["release"] == 3


# --- refresh --------------------------------------------------------------------------------


def test_refresh_renews_each_role_before_it_expires(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    assert repo.refresh(NOW) == []  # everything is fresh
    assert load(repo, "timestamp.json").signed.version == 1
    later = NOW + timedelta(hours=13)  # past half of the timestamp's day
    assert repo.refresh(later) == ["timestamp"]
    timestamp = check_chain(repo)["timestamp"].signed
    assert (timestamp.version, timestamp.expires) == (
        2,
        later.replace(microsecond=0) + timedelta(days=1),
    )
    assert repo.refresh(NOW + timedelta(days=4)) == ["snapshot", "timestamp"]
    assert repo.refresh(NOW + timedelta(days=46)) == ["targets", "snapshot", "timestamp"]
    chain = check_chain(repo)
    assert chain["targets"].signed.version == 2
    assert repo.refresh(NOW + timedelta(days=200)) == [
        "root", "targets", "snapshot", "timestamp",
    ]  # fmt: skip
    root_v2: Metadata[Root] = load(repo, "2.root.json")
    previous: Root = load(repo, "1.root.json").signed
    assert root_v2.signed.get_root_verification_result(
        previous, root_v2.signed_bytes, root_v2.signatures
    ).verified


def test_the_app_renews_metadata_on_its_interval_while_it_leads(tmp_path: Path) -> None:
    import asyncio

    from fleet.app import _renew

    repo = new_repo(tmp_path)
    later = NOW + timedelta(hours=13)

    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        seen: list[str] = []
        refresh = repo.refresh

        asked = 0

        def leads_from_the_fourth_look() -> bool:  # another replica leads at first
            nonlocal asked
            asked += 1
            return asked > 3

        def counting(now: datetime) -> list[str]:
            assert seen or asked == 4, "renewed while another replica led"
            renewed = refresh(now)
            seen.extend(renewed)
            loop.call_soon_threadsafe(done.set)
            return renewed

        repo.refresh = counting  # type: ignore[method-assign]
        task = asyncio.create_task(_renew(repo, 0.001, lambda: later, leads_from_the_fourth_look))
        await asyncio.wait_for(done.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(go())[:1] == ["timestamp"]
    assert check_chain(repo)["timestamp"].signed.expires == (
        later.replace(microsecond=0) + timedelta(days=1)
    )


def test_refresh_leaves_offline_roles_alone(tmp_path: Path) -> None:
    offline = tmp_path / "usb"
    repo = new_repo(tmp_path, offline_dir=offline, offline_roles=("root", "targets"))
    assert repo.keys.keyids("root") == repo.keys.keyids("targets") == []
    assert len(KeyStore(offline).keyids("root")) == 1
    renewed = repo.refresh(NOW + timedelta(days=300))
    assert renewed == ["snapshot", "timestamp"]
    assert repo.root().version == 1
    assert check_chain(repo)["targets"].signed.version == 1


# --- root rotation --------------------------------------------------------------------------


def test_rotating_an_online_role_goes_through_a_new_root(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    old_key = repo.keys.keyids("timestamp")[0]
    change = repo.rotate("timestamp", NOW)
    assert (change.version, change.published) == (2, True)
    assert repo.keys.keyids("timestamp") == list(change.keyids)  # the old key is deleted
    assert old_key not in change.keyids
    chain = check_chain(repo)  # the timestamp now verifies with the new key only
    assert list(chain["timestamp"].signatures) == list(change.keyids)
    root_v2 = chain["root"]
    assert root_v2.signed.get_root_verification_result(
        load(repo, "1.root.json").signed, root_v2.signed_bytes, root_v2.signatures
    ).verified


def test_rotating_the_director_changes_the_keys_in_root(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    before = repo.director_signers()[0].public_key.keyid
    change = repo.rotate("director", NOW, keys=2, threshold=2)
    director = director_keys_from_root(repo.root().to_dict())
    assert director.threshold == 2
    assert sorted(k.keyid for k in director.keys) == sorted(change.keyids)
    assert before not in [k.keyid for k in director.keys]
    assert sorted(s.public_key.keyid for s in repo.director_signers()) == sorted(change.keyids)


def test_rotating_targets_keys_re_signs_targets(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    repo.add_target(target(), NOW)
    change = repo.rotate("targets", NOW, keys=2, threshold=2)
    chain = check_chain(repo)  # targets verify under the new root, with both new keys
    assert sorted(chain["targets"].signatures) == sorted(change.keyids)
    assert "gemma3-270m/1.0/Q4_K_M.gguf" in chain["targets"].signed.targets


def test_root_rotation_needs_the_old_root_keys(tmp_path: Path) -> None:
    offline = tmp_path / "usb"
    repo = new_repo(tmp_path, root_keys=2, root_threshold=2, offline_dir=offline)
    old_root = repo.root_json()
    old_keys = [load_signer(p) for p in sorted((offline / "root").iterdir())]
    # Without the offline root keys the new root is only staged.
    change = repo.rotate("root", NOW, offline_dir=tmp_path / "usb2")
    assert not change.published
    assert "0 of 2 current root signatures, 2 of 2 new root signatures" in change.missing
    assert repo.root_json() == old_root
    staged = repo.staged_root()
    # Signed by the new keys alone, or with one of the two old ones, it is refused.
    with pytest.raises(InvalidInput, match="0 of 2 current root signatures"):
        repo.import_root(staged, NOW)
    md: Metadata[Root] = Metadata.from_bytes(staged)
    md.sign(old_keys[0], append=True)
    with pytest.raises(InvalidInput, match="1 of 2 current root signatures"):
        repo.import_root(md.to_bytes(), NOW)
    assert repo.root_json() == old_root
    md.sign(old_keys[1], append=True)
    assert repo.import_root(md.to_bytes(), NOW) == 2
    assert repo.root().roles["root"].keyids == list(change.keyids)
    check_chain(repo)
    with pytest.raises(Conflict, match="does not follow"):
        repo.import_root(md.to_bytes(), NOW)  # the same version again


def test_moving_an_online_root_key_offline(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)  # as the first `serve` leaves it: every key online
    old = repo.keys.keyids("root")
    change = repo.rotate("root", NOW, offline_dir=tmp_path / "usb")
    assert change.published
    assert repo.keys.keyids("root") == []  # the old online key is gone
    assert KeyStore(tmp_path / "usb").keyids("root") == list(change.keyids)
    chain = check_chain(repo)
    assert chain["root"].signed.roles["root"].keyids == list(change.keyids)
    assert sorted(chain["root"].signatures) == sorted([*old, *change.keyids])


def test_a_published_root_replaces_a_staged_one_and_its_keys(tmp_path: Path) -> None:
    offline = tmp_path / "usb"
    repo = new_repo(tmp_path, offline_dir=offline)
    staged = repo.rotate("snapshot", NOW)  # no root key: staged, its new key waits
    assert not staged.published
    assert len(repo.keys.keyids("snapshot")) == 2
    root_key = load_signer(next((offline / "root").iterdir()))
    published = repo.rotate("timestamp", NOW, signers=[root_key])
    assert published.published
    with pytest.raises(NotFound):
        repo.staged_root()
    assert repo.keys.keyids("snapshot") == repo.root().roles["snapshot"].keyids  # orphan gone
    assert staged.keyids[0] not in repo.keys.keyids("snapshot")
    check_chain(repo)


def test_rotation_with_offline_root_keys_given_on_the_command_line(tmp_path: Path) -> None:
    offline = tmp_path / "usb"
    repo = new_repo(tmp_path, offline_dir=offline)
    root_key = load_signer(next((offline / "root").iterdir()))
    change = repo.rotate("snapshot", NOW, signers=[root_key])
    assert change.published
    assert check_chain(repo)["root"].signed.version == 2


def test_import_root_refuses_an_expired_or_keyless_root(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    signer = repo.keys.signers("root")[0]
    md: Metadata[Root] = load(repo, "root.json")
    md.signed.version = 2
    md.signed.expires = NOW - timedelta(days=1)
    md.sign(signer)
    with pytest.raises(InvalidInput, match="expired"):
        repo.import_root(md.to_bytes(), NOW)
    md.signed.expires = NOW + timedelta(days=30)
    del md.signed.unrecognized_fields[DIRECTOR_ROOT_FIELD]
    md.sign(signer)
    with pytest.raises(InvalidInput, match="director"):
        repo.import_root(md.to_bytes(), NOW)
    assert repo.root().version == 1


# --- offline targets ------------------------------------------------------------------------


def test_import_targets_refuses_what_a_device_would(tmp_path: Path) -> None:
    repo = new_repo(tmp_path, targets_keys=2, targets_threshold=2)
    signers = repo.keys.signers("targets")
    md: Metadata[Targets] = load(repo, "targets.json")
    md.signed.version = 2
    md.sign(signers[0])
    with pytest.raises(InvalidInput, match="1 of 2 targets signatures"):
        repo.import_targets(md.to_bytes(), NOW)
    doubled = json.loads(md.to_bytes())
    doubled["signatures"].append(doubled["signatures"][0])  # one key counted twice
    with pytest.raises(InvalidInput, match="Multiple signatures"):
        repo.import_targets(json.dumps(doubled).encode(), NOW)
    md.signed.version = 1
    for signer in signers:
        md.sign(signer, append=True)
    with pytest.raises(Conflict, match="not newer"):
        repo.import_targets(md.to_bytes(), NOW)
    md.signed.version = 2
    md.signed.expires = NOW - timedelta(seconds=1)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    with pytest.raises(InvalidInput, match="expired"):
        repo.import_targets(md.to_bytes(), NOW)
    with pytest.raises(InvalidInput, match="not TUF metadata"):
        repo.import_targets(b"{}", NOW)
    with pytest.raises(InvalidInput, match="expected targets"):
        repo.import_targets(repo.root_json(), NOW)
    assert check_chain(repo)["targets"].signed.version == 1


def test_uploads_staged_while_the_admin_signs_are_kept_for_the_next_version(
    tmp_path: Path,
) -> None:
    usb = tmp_path / "usb"
    repo = new_repo(tmp_path, offline_dir=usb, offline_roles=("targets",))
    repo.add_target(target(version="1"), NOW)
    fetched: Metadata[Targets] = Metadata.from_bytes(repo.staged_targets(NOW))
    repo.add_target(target(version="2", data=GGUF + b"2"), NOW)  # arrives meanwhile
    fetched.sign(load_signer(next((usb / "targets").iterdir())))
    assert repo.import_targets(fetched.to_bytes(), NOW) == 2
    assert list(repo.targets()) == ["gemma3-270m/1/Q4_K_M.gguf"]
    following: Metadata[Targets] = Metadata.from_bytes(repo.staged_targets(NOW))
    assert following.signed.version == 3
    assert sorted(following.signed.targets) == [
        "gemma3-270m/1/Q4_K_M.gguf",
        "gemma3-270m/2/Q4_K_M.gguf",
    ]
    assert following.signed.targets["gemma3-270m/2/Q4_K_M.gguf"].custom["release"] == 2


def test_staged_targets_are_the_next_version_even_with_nothing_new(tmp_path: Path) -> None:
    repo = new_repo(tmp_path, offline_dir=tmp_path / "usb", offline_roles=("targets",))
    staged: Metadata[Targets] = Metadata.from_bytes(repo.staged_targets(NOW + timedelta(days=60)))
    assert staged.signed.version == 2
    assert staged.signatures == {}
    assert staged.signed.expires == (NOW + timedelta(days=150)).replace(microsecond=0)
    assert repo.staged_targets(NOW) == repo.staged_targets(NOW)  # stable until imported


# --- the API --------------------------------------------------------------------------------


def test_uploads_become_signed_targets_devices_can_fetch(api: TestClient, clock: Clock) -> None:
    body = uploaded(api, variant="Q4_K_M")
    _device, auth = _device_auth(api, clock)
    timestamp = api.get("/api/v1/tuf/timestamp.json", headers=auth)
    assert timestamp.status_code == 200, timestamp.text
    assert timestamp.headers["cache-control"] == "no-cache"
    snapshot_version = timestamp.json()["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = api.get(f"/api/v1/tuf/{snapshot_version}.snapshot.json", headers=auth)
    assert "immutable" in snapshot.headers["cache-control"]
    targets_version = snapshot.json()["signed"]["meta"]["targets.json"]["version"]
    targets = api.get(f"/api/v1/tuf/{targets_version}.targets.json", headers=auth).json()
    entry = targets["signed"]["targets"]["gemma3-270m/1.0.0/Q4_K_M.gguf"]
    assert entry["hashes"] == {"sha256": body["sha256"]}
    assert entry["length"] == body["size_bytes"]
    assert entry["custom"]["release"] == 1
    root = api.get("/api/v1/tuf/1.root.json", headers=auth)
    assert root.content == api.get("/api/v1/tuf/root.json", headers=auth).content
    # An identical re-upload signs nothing new.
    assert (
        api.post(
            "/api/v1/models/gemma3-270m/versions/1.0.0",
            params={"variant": "Q4_K_M"},
            content=GGUF,
            headers={"Content-Type": "application/octet-stream"},
        ).status_code
        == 200
    )
    again = api.get("/api/v1/tuf/timestamp.json", headers=auth).json()
    assert again["signed"]["version"] == timestamp.json()["signed"]["version"]


def _device_auth(api: TestClient, clock: Clock) -> tuple[str, dict[str, str]]:
    body = enroll(api, clock)
    return body["device_id"], basic(body["broker"]["username"], body["broker"]["password"])


def test_metadata_needs_device_or_admin_credentials(api: TestClient, clock: Clock) -> None:
    device_id, auth = _device_auth(api, clock)
    none = api.get("/api/v1/tuf/timestamp.json", headers={"Authorization": ""})
    assert error(none)[:2] == (401, "unauthorized")
    assert none.headers["www-authenticate"].startswith("Basic")
    wrong = api.get("/api/v1/tuf/timestamp.json", headers=basic(device_id, "nope"))
    assert error(wrong)[:2] == (401, "unauthorized")
    assert api.get("/api/v1/tuf/timestamp.json").status_code == 200  # the admin token
    for name in ["passwd", "1.timestamp.json.bak", "0.root.json", "..%2Froot.json", "keys"]:
        assert api.get(f"/api/v1/tuf/{name}", headers=auth).status_code == 404, name
    assert error(api.get("/api/v1/tuf/99.root.json", headers=auth))[:2] == (404, "not_found")
    assert api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    assert error(api.get("/api/v1/tuf/timestamp.json", headers=auth))[:2] == (403, "forbidden")


def test_admin_routes_need_the_admin_token(api: TestClient, clock: Clock) -> None:
    _device, auth = _device_auth(api, clock)
    for method, path in [
        ("GET", "/api/v1/tuf/status"),
        ("GET", "/api/v1/tuf/staged/targets.json"),
        ("GET", "/api/v1/tuf/staged/root.json"),
        ("PUT", "/api/v1/tuf/targets"),
        ("PUT", "/api/v1/tuf/root"),
    ]:
        response = api.request(method, path, headers=auth)  # a device cannot
        assert error(response)[:2] == (401, "unauthorized"), path


def test_tuf_status_route(api: TestClient) -> None:
    body = api.get("/api/v1/tuf/status").json()
    roles = {r["role"]: r for r in body["roles"]}
    assert set(roles) == {"root", "targets", "snapshot", "timestamp", "director"}
    assert roles["root"]["online"] == roles["root"]["keyids"]  # first start: all online
    assert body["staged_targets_version"] is None
    assert error(api.get("/api/v1/tuf/staged/root.json"))[:2] == (404, "not_found")


@pytest.fixture
def offline_settings(settings: FleetSettings, tmp_path: Path) -> FleetSettings:
    """A data folder initialised with root and targets keys in ``tmp_path/usb``."""
    open_repository(settings).init(
        START,
        targets_keys=2,
        targets_threshold=2,
        offline_dir=tmp_path / "usb",
        offline_roles=("root", "targets"),
    )
    return settings


def test_offline_targets_signing_end_to_end(
    offline_settings: FleetSettings, link: FakeLink, clock: Clock, tmp_path: Path
) -> None:
    from tests.fleet.helpers import ADMIN

    app = create_app(offline_settings, link.factory(), clock=clock)
    with TestClient(app, headers=ADMIN) as api:
        uploaded(api, variant="Q4_K_M")
        path = "gemma3-270m/1.0.0/Q4_K_M.gguf"
        assert path not in api.get("/api/v1/tuf/targets.json").json()["signed"]["targets"]
        status = api.get("/api/v1/tuf/status").json()
        assert status["staged_targets_version"] == 2

        # The admin fetches the staged targets, signs them on the offline machine...
        staged = tmp_path / "targets.json"
        fetch = runner.invoke(
            cli_app,
            ["keys", "staged", "targets", "-o", str(staged), "--admin-token", ADMIN_TOKEN],
            obj={"http": api},
            catch_exceptions=False,
        )
        assert fetch.exit_code == 0, fetch.output
        assert json.loads(staged.read_text())["signatures"] == []
        keys = sorted((tmp_path / "usb" / "targets").iterdir())
        one = runner.invoke(cli_app, ["keys", "sign", str(staged), "--key", str(keys[0])])
        assert one.exit_code == 0, one.output
        assert "1 signature(s)" in one.output
        # ...one signature of two is refused, and nothing changes...
        refused = api.put("/api/v1/tuf/targets", content=staged.read_bytes())
        status_code, code, message = error(refused)
        assert (status_code, code) == (422, "invalid_input")
        assert "1 of 2 targets signatures" in message
        two = runner.invoke(cli_app, ["keys", "sign", str(staged), "--key", str(keys[1])])
        assert "2 signature(s)" in two.output
        # ...and with both it is published, with a new snapshot and timestamp.
        before = api.get("/api/v1/tuf/timestamp.json").json()["signed"]["version"]
        publish = runner.invoke(
            cli_app,
            ["keys", "import", str(staged), "--admin-token", ADMIN_TOKEN],
            obj={"http": api},
            catch_exceptions=False,
        )
        assert publish.exit_code == 0, publish.output
        assert "published targets v2" in publish.output
        targets = api.get("/api/v1/tuf/2.targets.json").json()["signed"]["targets"]
        assert targets[path]["custom"]["release"] == 1
        assert api.get("/api/v1/tuf/timestamp.json").json()["signed"]["version"] == before + 1
        assert api.get("/api/v1/tuf/status").json()["staged_targets_version"] is None
        # Importing the same version again is a conflict.
        assert error(api.put("/api/v1/tuf/targets", content=staged.read_bytes()))[0] == 409


def test_offline_root_rotation_end_to_end(
    offline_settings: FleetSettings, link: FakeLink, clock: Clock, tmp_path: Path
) -> None:
    from tests.fleet.helpers import ADMIN

    repo = open_repository(offline_settings)
    change = repo.rotate("root", START, offline_dir=tmp_path / "usb-new")
    assert not change.published
    old_key = next((tmp_path / "usb" / "root").iterdir())
    new_key = change.key_files[0]
    assert new_key.parent == tmp_path / "usb-new" / "root"

    def cli(*args: str, http: TestClient | None = None) -> str:
        extra = ["--admin-token", ADMIN_TOKEN] if http is not None else []
        result = runner.invoke(cli_app, [*args, *extra], obj={"http": http})
        assert result.exit_code == 0, result.output
        return result.output

    with TestClient(
        create_app(offline_settings, link.factory(), clock=clock), headers=ADMIN
    ) as api:
        staged = tmp_path / "root.json"
        assert "root v2" in cli("keys", "staged", "root", "-o", str(staged), http=api)
        cli("keys", "sign", str(staged), "--key", str(new_key))
        half = api.put("/api/v1/tuf/root", content=staged.read_bytes())
        assert "0 of 1 current root signatures" in error(half)[2]
        assert api.get("/api/v1/tuf/root.json").json()["signed"]["version"] == 1
        cli("keys", "sign", str(staged), "--key", str(old_key))
        assert "published root v2" in cli("keys", "import", str(staged), http=api)
        root = api.get("/api/v1/tuf/root.json").json()
        assert root["signed"]["version"] == 2
        assert root["signed"]["roles"]["root"]["keyids"] == list(change.keyids)
        assert api.get("/api/v1/tuf/status").json()["staged_root_version"] is None


def test_artifacts_registered_before_tuf_become_targets_at_start(
    settings: FleetSettings, link: FakeLink, clock: Clock
) -> None:
    from tests.fleet.helpers import ADMIN

    with TestClient(create_app(settings, link.factory(), clock=clock), headers=ADMIN) as api:
        uploaded(api)
    # A controller from before TUF: the database has the artifact, no TUF repository.
    import shutil

    shutil.rmtree(settings.resolved_tuf_dir)
    shutil.rmtree(settings.resolved_key_dir)
    with TestClient(create_app(settings, link.factory(), clock=clock), headers=ADMIN) as api:
        targets = api.get("/api/v1/tuf/targets.json").json()["signed"]["targets"]
        assert list(targets) == ["gemma3-270m/1.0.0/default.gguf"]
        assert targets["gemma3-270m/1.0.0/default.gguf"]["hashes"]["sha256"] == sha(GGUF)


def test_the_app_signs_desired_states_with_the_director_key(api: TestClient) -> None:
    from fleet.app import desired_signer
    from models.director import verify_desired
    from models.wire import DesiredState

    state: Any = api.app.state.fleet  # type: ignore[attr-defined]
    repo: TufRepository = state.tuf
    desired = DesiredState(device_id="dev-0000000000000001", version=1, models=[])
    raw = desired_signer(repo)(desired)
    director = director_keys_from_root(repo.root().to_dict())
    now = datetime.now(desired.expires.tzinfo)
    verified = verify_desired(
        raw, director, device_id=desired.device_id, last_version=None, now=now
    )
    assert verified == desired


# --- the CLI --------------------------------------------------------------------------------


def test_cli_keys_init_status_rotate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    usb = tmp_path / "usb"

    def run(*args: str) -> str:
        result = runner.invoke(cli_app, [*args, "--data-dir", str(data)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run(
        "keys", "init", "--root-keys", "3", "--root-threshold", "2", "--offline-dir", str(usb)
    )
    assert "created the TUF repository" in out
    assert len(list((usb / "root").iterdir())) == 3
    assert str(usb / "root") in out
    status = json.loads(run("keys", "status", "--json"))
    roles = {r["role"]: r for r in status["roles"]}
    assert (len(roles["root"]["keyids"]), roles["root"]["threshold"]) == (3, 2)
    assert roles["root"]["online"] == []
    assert roles["timestamp"]["online"] == roles["timestamp"]["keyids"]
    assert "2 of 3" in run("keys", "status")

    again = runner.invoke(cli_app, ["keys", "init", "--data-dir", str(data)])
    assert again.exit_code == 1
    assert "already exists" in again.output

    staged = run("keys", "rotate", "timestamp")
    assert "staged" in staged  # no root keys given: root v2 waits for signatures
    assert "0 of 2 current root signatures" in staged
    root_keys = sorted((usb / "root").iterdir())[:2]
    key_args = [a for k in root_keys for a in ("--root-key", str(k))]
    assert "published root v2" in run("keys", "rotate", "timestamp", *key_args)

    bad = runner.invoke(cli_app, ["keys", "rotate", "nobody", "--data-dir", str(data)])
    assert bad.exit_code == 1
    assert "unknown role" in bad.output


def test_cli_sign_refuses_what_is_not_metadata_or_a_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    key = tmp_path / "key.pem"
    key.write_bytes(CryptoSigner.generate_ed25519().private_bytes)
    result = runner.invoke(cli_app, ["keys", "sign", str(junk), "--key", str(key)])
    assert result.exit_code == 1
    assert "not TUF metadata" in result.output
    not_key = runner.invoke(cli_app, ["keys", "sign", str(junk), "--key", str(junk)])
    assert not_key.exit_code == 1
    assert "not an unencrypted PKCS#8 PEM private key" in not_key.output
    assert junk.read_text() == "{}"


def test_metadata_file_names_are_the_only_names_served(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    for name in ["x.json", "root", "1.root.json/..", "-1.root.json", "01.root.json"]:
        with pytest.raises(NotFound):
            repo.read(name)
    assert (
        hashlib.sha256(repo.read("snapshot.json")).hexdigest()
        == (load(repo, "timestamp.json").signed.snapshot_meta.hashes["sha256"])
    )


def test_expiries_come_from_the_settings(tmp_path: Path) -> None:
    settings = FleetSettings(
        data_dir=tmp_path,
        admin_token=SecretStr(ADMIN_TOKEN),
        tuf_timestamp_expiry_days=0.5,
        tuf_root_expiry_days=30,
    )
    repo = open_repository(settings)
    assert repo.expiries == Expiries(
        root=timedelta(days=30),
        targets=timedelta(days=90),
        snapshot=timedelta(days=7),
        timestamp=timedelta(hours=12),
    )
    assert repo.path == tmp_path / "tuf"
    assert repo.keys.root == tmp_path / "keys"
