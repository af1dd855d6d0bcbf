"""Provision an image against the real controller, then boot an agent from what it wrote.

A real ``edgefleet serve`` (SQLite, a real Mosquitto) makes a batch of tokens into a
``tokens.csv`` with its own CLI; ``edgefleet-agent provision`` stamps one into an
unpacked root filesystem; an agent process then starts as the image's systemd unit
would: the image's ``agent.toml``, and ``provision.env`` as its environment. Since the
test cannot chroot, the env file's ``/etc/edgefleet/...`` paths are read under the
rootfs. The agent must enroll with the provisioned token (spent only then), trust the
provisioned TUF root, and report its progress through ``edgefleet-agent status``. The
controller's refusals (a used, a revoked, an unknown token) must leave an image untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_cli
from agent.provision import ENV_FILE, ROOT_JSON
from scripts.servers import Controller, MosquittoBroker, free_port, running_controller
from tests.agent.test_provision import make_rootfs, mode, parse_env_file
from tests.conftest import AGENT_BIN, AgentProcess, wait_ready, write_config
from tests.polling import wait_until

pytestmark = pytest.mark.integration

EVERY_S = 0.1  # seconds between probes of another process


@pytest.fixture
def controller(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Controller]:
    with running_controller(
        tmp_path,
        f"sqlite:///{tmp_path / 'fleet.db'}",
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
    ) as running:  # fmt: skip
        yield running


def admin(controller: Controller) -> httpx.Client:
    token = (controller.data_dir / "admin-token").read_text().strip()
    return httpx.Client(
        base_url=controller.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def tokens(controller: Controller) -> dict[str, dict[str, Any]]:
    with admin(controller) as api:
        return {t["id"]: t for t in api.get("/api/v1/tokens").json()}


def csv_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def provision(rootfs: Path, fleet_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(agent_cli, ["provision", str(rootfs), "--fleet", fleet_url, *args])
    return result.exit_code, " ".join(result.output.split())


def boot_agent(rootfs: Path, model_store: Path, log: Path) -> AgentProcess:
    """Start the agent as the unit does: the image's config, provision.env as environment."""
    port = free_port()
    config = write_config(
        rootfs / "etc/edgefleet/agent.toml",
        {
            "port": port,
            "store_dir": model_store,
            "fleet": {"state_dir": rootfs / "var/lib/edgefleet/agent"},
        },
        [{"name": "minilm"}],  # baked into the image
    )
    provisioned = parse_env_file((rootfs / ENV_FILE).read_text())
    in_image = {
        k: v.replace("/etc/edgefleet/", f"{rootfs}/etc/edgefleet/") for k, v in provisioned.items()
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_AGENT_")}
    env.update(in_image, PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(AGENT_BIN), "serve", "--config", str(config), "--log-level", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=rootfs.parent,
        )
    agent = AgentProcess(proc, f"http://127.0.0.1:{port}", config, log)
    wait_ready(agent)
    return agent


def test_a_provisioned_image_enrolls_with_its_token_and_trusts_its_root(
    tmp_path: Path, controller: Controller, model_store: Path
) -> None:
    csv = tmp_path / "tokens.csv"
    controller.cli("groups", "create", "lab")
    controller.cli("tokens", "create", "--count", "3", "--group", "lab", "--out", str(csv))
    rows = csv_rows(csv)
    assert [r["index"] for r in rows] == ["1", "2", "3"]

    rootfs = make_rootfs(tmp_path / "rootfs")
    code, output = provision(rootfs, controller.url, "--tokens", str(csv), "--index", "2")
    assert code == 0, output
    assert f"token {rows[1]['token_id']}, group lab, 1 use left" in output
    assert "edgefleet-agent status" in output
    root = json.loads((rootfs / ROOT_JSON).read_text())
    assert root["signed"]["_type"] == "root"
    assert mode(rootfs / ENV_FILE) == 0o640
    env = parse_env_file((rootfs / ENV_FILE).read_text())
    assert env["EDGEFLEET_AGENT_FLEET__TOKEN"] == rows[1]["secret"]
    assert env["EDGEFLEET_AGENT_FLEET__URL"] == controller.url
    assert tokens(controller)[rows[1]["token_id"]]["uses_left"] == 1  # checking spends nothing

    agent = boot_agent(rootfs, model_store, tmp_path / "agent.log")
    try:
        fleet = wait_until(
            lambda: (s := httpx.get(f"{agent.url}/v1/fleet", timeout=5).json())["connected"] and s,
            "the agent to enroll and connect",
            every_s=EVERY_S,
            detail=agent.tail,
        )
        assert fleet["trust_root"] is True  # the provisioned root, not one sent at enrollment
        with admin(controller) as api:
            device = api.get(f"/api/v1/devices/{fleet['device_id']}").json()
        assert device["group"] == "lab"
        assert tokens(controller)[rows[1]["token_id"]]["uses_left"] == 0  # spent by enrolling
        state = rootfs / "var/lib/edgefleet/agent"
        trusted = json.loads((state / "tuf" / "root.json").read_text())
        assert trusted == json.loads((rootfs / ROOT_JSON).read_text())
        status = CliRunner().invoke(agent_cli, ["status", "--config", str(agent.config), "--json"])
        assert status.exit_code == 0, status.output
        report = json.loads(status.output)
        steps = report["boot"]["steps"]
        for step in ("provisioned", "device_key", "enrolled", "models", "serving"):
            assert steps[step]["state"] == "done", (step, steps[step])
        assert steps["enrolled"]["detail"] == f"device {fleet['device_id']} of {controller.url}"
    finally:
        agent.stop()

    # The token is used up now: provisioning another image with it is refused, untouched.
    other = make_rootfs(tmp_path / "other")
    code, output = provision(other, controller.url, "--tokens", str(csv), "--index", "2")
    assert code == 2
    assert f"error: the fleet at {controller.url} refused the token (HTTP 403)" in output
    assert "used up" in output
    assert not (other / ENV_FILE).exists()


def test_the_real_controllers_refusals_leave_the_image_untouched(
    tmp_path: Path, controller: Controller
) -> None:
    csv = tmp_path / "tokens.csv"
    controller.cli("tokens", "create", "--count", "2", "--out", str(csv))
    rows = csv_rows(csv)
    controller.cli("tokens", "revoke", rows[0]["token_id"])
    rootfs = make_rootfs(tmp_path / "rootfs")
    code, output = provision(rootfs, controller.url, "--tokens", str(csv), "--index", "1")
    assert code == 2
    assert "was revoked" in output
    code, output = provision(rootfs, controller.url, "--token", "eft_nobody_made_this")
    assert code == 2
    assert "unknown enrollment token" in output
    assert "edgefleet tokens create" in output
    assert sorted(p.name for p in (rootfs / "etc/edgefleet").iterdir()) == ["agent.toml"]
    code, output = provision(rootfs, controller.url, "--tokens", str(csv), "--index", "2")
    assert code == 0, output
