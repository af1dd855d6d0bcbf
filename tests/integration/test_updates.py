"""Signed model updates end to end: a real controller signs, a real agent verifies and installs.

Every step runs for real: the upload into the registry, TUF signing on the controller,
the director-signed desired state over MQTT, ngclient's refresh on the agent, the
resumable download, the A/B install, the health check with golden prompts on the real
Gemma model, and the rollback when a validly signed file turns out to be broken.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.update_support import (
    EVERY_S,
    UPDATE_S,
    Artifacts,
    Fleet,
    make_artifacts,
    update_fleet,
)
from tests.polling import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Artifacts:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"), model_store)


@pytest.fixture
def fleet(tmp_path: Path, model_store: Path) -> object:
    with update_fleet(tmp_path, model_store) as running:
        yield running


def test_update_installs_health_checks_and_rolls_back_a_broken_model(
    fleet: Fleet, artifacts: Artifacts
) -> None:
    sha11 = fleet.push(artifacts.v11, "1.1")
    fleet.desire("1.1")
    wait_until(
        lambda: fleet.served_version() == "1.1",
        "version 1.1 served",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    healthy = wait_until(
        lambda: fleet.events("update_healthy"),
        "an update_healthy event",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    assert healthy[0]["data"]["sha256"] == sha11
    progress = fleet.events("update_progress")
    assert progress, "download progress was reported"
    assert max(e["data"]["bytes"] for e in progress) == artifacts.v11.stat().st_size
    assert fleet.events("update_verified")
    assert fleet.events("update_installed")
    assert fleet.chat()
    shown = fleet.controller.cli("devices", "events", fleet.device_id, "--since", "1h")
    assert "1.1: healthy, serving" in shown
    assert "% downloaded" in shown

    # Validly signed, but not a working model: the health check fails, 1.1 keeps serving.
    for n, broken in enumerate((artifacts.truncated, artifacts.garbage), 1):
        fleet.push(broken, f"9.{n}")
        fleet.desire(f"9.{n}")
        rolled = wait_until(
            lambda n=n: [
                e for e in fleet.events("update_rolled_back") if e["data"]["version"] == f"9.{n}"
            ],
            f"the broken 9.{n} rolled back",
            within_s=UPDATE_S,
            every_s=EVERY_S,
        )
        assert "health check failed" in rolled[0]["data"]["reason"]
        assert fleet.served_version() == "1.1"
        assert fleet.chat()
    # A model that loads and answers, but not what its golden prompt expects.
    fleet.push(artifacts.v12, "1.2", golden=[{"prompt": "2+2=", "expect": "Zanzibar"}])
    fleet.desire("1.2")
    rolled = wait_until(
        lambda: [e for e in fleet.events("update_rolled_back") if e["data"]["version"] == "1.2"],
        "1.2 rolled back on its golden prompt",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    assert "lacks 'Zanzibar'" in rolled[0]["data"]["reason"]
    assert fleet.served_version() == "1.1"
    # Each rollback was said once, as a rollback: 1.1 kept serving, so no model failed.
    assert not fleet.events("model_failed")
    rolled_back = fleet.events("update_rolled_back")
    assert sorted(e["data"]["version"] for e in rolled_back) == ["1.2", "9.1", "9.2"]
    assert all(e["data"]["phase"] == "health" and e["data"]["sha256"] for e in rolled_back)
    drift = fleet.reported()["drift"]
    assert not drift["in_sync"], "a rolled-back update is drift the admin sees"

    # A legitimate rollback is a new desired state naming the older target.
    fleet.push(artifacts.original, "1.0")
    fleet.desire("1.0")
    wait_until(
        lambda: fleet.served_version() == "1.0",
        "version 1.0 served again",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    assert fleet.chat()


def test_an_artifact_changed_on_the_server_is_never_served_and_a_push_restores_it(
    fleet: Fleet, artifacts: Artifacts
) -> None:
    # A model whose signed RAM requirement exceeds the device's is refused unread.
    fleet.push(artifacts.v11, "1.1", ram_bytes=1 << 50)
    fleet.desire("1.1")
    refused = wait_until(
        lambda: [e for e in fleet.events("update_failed") if "RAM" in e["data"]["reason"]],
        "the oversized model refused",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    assert refused[0]["data"]["phase"] == "verify"
    assert not fleet.events("update_progress"), "nothing was downloaded"

    sha = fleet.push(artifacts.v12, "1.2")
    blob = fleet.controller.data_dir / "artifacts" / "sha256" / sha[:2] / sha
    assert blob.is_file()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte flipped on the server, after signing
    blob.write_bytes(bytes(data))
    # The controller hashes the changed file before sending a byte: quarantined, 503.
    with fleet.api() as api:
        response = api.get(f"/api/v1/artifacts/{sha}")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "artifact_corrupt"
    assert "push the model again" in response.json()["error"]["message"]
    assert not blob.exists()
    quarantined = list((fleet.controller.data_dir / "artifacts" / "quarantine").iterdir())
    assert [q.read_bytes() for q in quarantined] == [bytes(data)]  # kept for inspection
    assert fleet.served_version() != "1.2"
    assert fleet.chat()
    # The admin pushes the same file again: the store has the right bytes, devices get them.
    assert fleet.push(artifacts.v12, "1.2") == sha
    fleet.desire("1.2")
    wait_until(
        lambda: fleet.served_version() == "1.2",
        "1.2 served from the restored artifact",
        within_s=UPDATE_S,
        every_s=EVERY_S,
    )
    assert not [e for e in fleet.events("update_failed") if e["data"].get("sha256") == sha]
    assert not fleet.events("model_failed"), "no model failed: the bad bytes never left"
