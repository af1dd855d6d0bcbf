"""A stored artifact whose bytes changed on disk is quarantined and never served.

The store is the real one on a real folder; a swapped file is written beside it and
renamed over it, as a careless copy or an attacker with the volume would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import fleet.registry.integrity as integrity_module
from fleet.cli import app as fleet_cli
from fleet.config import FleetSettings
from fleet.errors import ArtifactCorrupt, NotFound
from fleet.registry.store import ArtifactStore
from tests.fleet.helpers import Clock, error
from tests.fleet.test_registry import GGUF, device_auth, sha, upload, uploaded


def swap(path: Path, data: bytes) -> None:
    """Replace the file at ``path`` with ``data``, keeping its mode."""
    other = path.with_name(".swap")
    other.write_bytes(data)
    other.chmod(0o600)
    other.replace(path)


def served(store: ArtifactStore, digest: str) -> Path:
    """The file the controller would send for ``digest`` (hashed first unless unchanged)."""
    local = store.verified(digest).local
    assert local is not None
    return local


def hashes_counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the store hashes from now on (the real hash still runs)."""
    seen: list[Path] = []
    real = integrity_module.sha256_of

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(integrity_module, "sha256_of", counting)
    return seen


def test_a_file_is_hashed_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.ingest_sync([GGUF]).sha256
    hashed = hashes_counted(monkeypatch)
    assert served(store, digest).read_bytes() == GGUF
    assert hashed == []  # hashed as it was stored
    swap(store.path(digest), GGUF)  # the same bytes, but another file: hash it again
    assert served(store, digest) == store.path(digest)
    assert served(store, digest) == store.path(digest)
    assert hashed == [store.path(digest)]


def test_a_swapped_file_is_quarantined_and_a_new_ingest_restores_it(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.ingest_sync([GGUF]).sha256
    swap(store.path(digest), b"GGUF and something else")
    with pytest.raises(ArtifactCorrupt, match="push the model again") as raised:
        served(store, digest)
    assert digest in str(raised.value)
    assert not store.path(digest).exists()
    (quarantined,) = (tmp_path / "quarantine").iterdir()
    assert quarantined.name.startswith(f"{digest}-")
    assert quarantined.read_bytes() == b"GGUF and something else"
    assert str(quarantined) in str(raised.value)
    with pytest.raises(NotFound):
        served(store, digest)  # moved away: nothing to serve

    assert store.ingest_sync([GGUF]).new  # the admin pushes it again
    assert served(store, digest).read_bytes() == GGUF


def test_pushing_again_replaces_a_changed_file_not_yet_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.ingest_sync([GGUF]).sha256
    swap(store.path(digest), b"X" * len(GGUF))  # the same size: only its hash tells
    again = store.ingest_sync([GGUF])
    assert again.new  # the changed file was not taken for the same content
    assert store.path(digest).read_bytes() == GGUF
    hashed = hashes_counted(monkeypatch)
    assert not store.ingest_sync([GGUF]).new  # now it is the same content, known good
    assert served(store, digest).read_bytes() == GGUF
    assert hashed == []


def test_scrub_hashes_every_file_and_reports_the_bad_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)
    good = store.ingest_sync([GGUF]).sha256
    bad = store.ingest_sync([GGUF + b"v2"]).sha256
    bad_path = store.path(bad)
    with bad_path.open("r+b") as f:  # one byte flipped in place, same size, same inode
        f.seek(2)
        f.write(b"X")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "tmp" / ".tmp-upload").write_bytes(b"half")  # an upload under way: not checked
    hashed = hashes_counted(monkeypatch)
    seen: list[str] = []
    report = store.scrub(progress=seen.append)
    assert report.checked == 2
    assert sorted(seen) == sorted([good, bad])
    assert sorted(hashed) == sorted([store.path(good), bad_path])  # even the verified one
    assert list(report.corrupt) == [bad]
    assert Path(report.corrupt[bad]).parent == tmp_path / "quarantine"
    assert not bad_path.exists()
    assert served(store, good).read_bytes() == GGUF
    assert store.scrub().corrupt == {}  # the store is clean now


def test_the_api_answers_503_for_a_changed_file_and_serves_it_again_after_a_push(
    api: TestClient, clock: Clock, settings: FleetSettings
) -> None:
    body = uploaded(api)
    _, auth = device_auth(api, clock)
    url = f"/api/v1/artifacts/{body['sha256']}"
    blob = settings.resolved_artifact_dir / "sha256" / sha(GGUF)[:2] / sha(GGUF)
    swap(blob, GGUF[:-1] + b"!")
    status, code, message = error(api.get(url, headers=auth))
    assert (status, code) == (503, "artifact_corrupt")
    assert "push the model again" in message
    assert api.head(url, headers=auth).status_code == 404  # quarantined: nothing to send

    assert upload(api, GGUF).status_code == 200  # the same file pushed again: no new row
    response = api.get(url, headers=auth)
    assert response.status_code == 200
    assert response.content == GGUF


def test_the_scrub_command_exits_1_and_names_each_corrupt_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")  # the data folder's default store
    good = store.ingest_sync([GGUF]).sha256
    bad = store.ingest_sync([GGUF + b"v2"]).sha256
    swap(store.path(bad), b"not the model")
    scrub = ["models", "scrub", "--data-dir", str(tmp_path)]

    result = CliRunner().invoke(fleet_cli, [*scrub, "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["checked"] == 2
    assert list(report["corrupt"]) == [bad]
    assert "push those models again" in result.stderr

    again = CliRunner().invoke(fleet_cli, scrub)
    assert again.exit_code == 0, again.output
    assert f"checked 1 artifact(s) in {store.root}" in again.stdout
    assert served(store, good).read_bytes() == GGUF
