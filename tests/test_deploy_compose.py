"""deploy/compose, checked without Docker: the files agree with each other and with the code.

No container runtime runs here, so what can be checked is checked with the real parts:
every setting and flag the compose files give the controller exists, haproxy and
nats-server accept their configuration files, and ``nats-node.sh`` runs a real
nats-server on the users file a controller writes, reloading it when that file changes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from fleet.cli import app
from fleet.config import FleetSettings
from fleet.link.broker_auth import DeviceCredential, write_auth_files
from fleet.link.passwords import hash_bcrypt, hash_password
from scripts.servers import free_port
from tests.integration.test_broker_cluster import Peer
from tests.polling import wait_until

COMPOSE = Path(__file__).parents[1] / "deploy" / "compose"
FILES = ["compose.yaml", "compose.nats.yaml"]


def compose(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / name).read_text())
    return loaded


def controllers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in spec["services"].items() if k.startswith("controller-")}


@pytest.mark.parametrize("name", FILES)
def test_every_controller_setting_and_flag_exists(name: str) -> None:
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    options = {opt for param in serve.params for opt in param.opts}
    fields = {f"EDGEFLEET_FLEET_{field.upper()}" for field in FleetSettings.model_fields}
    replicas = controllers(compose(name))
    assert len(replicas) == 3
    for service in replicas.values():
        assert service["command"][0] == "serve"
        for flag in service["command"][1:]:
            assert flag.split("=", 1)[0] in options, flag
        assert set(service["environment"]) <= fields
    client_ids = {s["environment"]["EDGEFLEET_FLEET_CLIENT_ID"] for s in replicas.values()}
    assert len(client_ids) == 3  # a shared client id would knock each other off the broker


@pytest.mark.parametrize("name", FILES)
def test_every_mounted_file_is_in_the_repository(name: str) -> None:
    for service in compose(name)["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (COMPOSE / source).is_file(), f"{name}: {source} is missing"


def haproxy_servers(config: str) -> set[str]:
    return set(re.findall(r"^\s+server (\S+) \1:", config, flags=re.MULTILINE))


def test_the_nats_deployment_wires_the_nodes_the_load_balancer_and_ingest_together() -> None:
    spec = compose("compose.nats.yaml")
    nodes = {k for k in spec["services"] if k.startswith("nats-")}
    assert nodes == {"nats-1", "nats-2", "nats-3"}
    balanced = haproxy_servers((COMPOSE / "haproxy.nats.cfg").read_text())
    assert balanced == nodes | set(controllers(spec))
    routes = set(re.findall(r"nats-route://(\S+):6222", (COMPOSE / "nats.conf").read_text()))
    assert routes == nodes
    for service in controllers(spec).values():
        assert "--broker-auth-format=nats" in service["command"]
        ingest = service["environment"]["EDGEFLEET_FLEET_NATS_INGEST_URL"]
        assert set(re.findall(r"nats://([^:]+):4222", ingest)) == nodes


needs_tools = pytest.mark.skipif(
    shutil.which("nats-server") is None or shutil.which("haproxy") is None,
    reason="nats-server and haproxy (Debian) check the configuration files",
)


@pytest.mark.integration
@needs_tools
@pytest.mark.parametrize("name", ["haproxy.cfg", "haproxy.nats.cfg"])
def test_haproxy_accepts_its_configuration(name: str) -> None:
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(COMPOSE / name)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr


def users_written(auth_dir: Path, *devices: tuple[str, str]) -> Path:
    """The users file a controller writes, with ``(device id, password)`` logins."""
    settings = FleetSettings(
        data_dir=auth_dir.parent,
        broker_auth_dir=auth_dir,
        broker_url="mqtt://haproxy:1883",
        broker_auth_format="nats",
    )
    credentials = [
        DeviceCredential(name, hash_password(pw), revoked=False, bcrypt_hash=hash_bcrypt(pw))
        for name, pw in devices
    ]
    (users_file,) = write_auth_files(settings, hash_bcrypt("controller"), credentials).files
    return users_file


@pytest.mark.integration
@needs_tools
def test_nats_server_accepts_the_node_configuration(tmp_path: Path) -> None:
    config = tmp_path / "nats.conf"
    shutil.copy(COMPOSE / "nats.conf", config)
    users_written(tmp_path / "auth", ("dev-a", "pw-a"))
    env = {**os.environ, "NATS_NAME": "n1"}
    checked = subprocess.run(
        ["nats-server", "-t", "-c", str(config)], capture_output=True, text=True, env=env
    )
    assert checked.returncode == 0, checked.stderr


class Node:
    """``nats-node.sh`` on a one-node configuration of its own ports, as a container runs it."""

    def __init__(self, root: Path) -> None:
        self.mqtt_port = free_port()
        self.users_file = root / "auth" / "nats-users.conf"
        config = root / "nats.conf"
        config.write_text(
            "server_name: t1\n"  # the MQTT gateway needs one
            f"listen: 127.0.0.1:{free_port()}\n"
            f"jetstream {{ store_dir: {root / 'js'} }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
            'include "auth/nats-users.conf"\n'
        )
        self.log = root / "node.log"
        env = {
            **os.environ,
            "NATS_CONFIG": str(config),
            "NATS_USERS_FILE": str(self.users_file),
            "NATS_RELOAD_POLL_S": "0.1",
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                ["sh", str(COMPOSE / "nats-node.sh")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def connack(self, login: tuple[str, str]) -> int:
        peer = Peer(self, login[0], login=login)  # type: ignore[arg-type]
        try:
            return peer.connect()
        finally:
            peer.close()

    name = "node"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    running = Node(tmp_path)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


@pytest.mark.integration
@needs_tools
def test_a_node_waits_for_its_users_and_reloads_when_they_change(node: Node) -> None:
    wait_until(lambda: b"waiting for" in node.log.read_bytes(), "the node waiting for its users")
    assert node.process.poll() is None

    users_written(node.users_file.parent, ("dev-a", "pw-a"))
    wait_until(lambda: node.connack(("dev-a", "pw-a")) == 0, "dev-a let in", ignoring=(OSError,))
    assert node.connack(("dev-b", "pw-b")) == 135

    users_written(node.users_file.parent, ("dev-b", "pw-b"))  # a enrolled, b revoked
    wait_until(lambda: node.connack(("dev-b", "pw-b")) == 0, "dev-b let in after the reload")
    assert node.connack(("dev-a", "pw-a")) == 135

    node.process.send_signal(signal.SIGTERM)  # as docker stop, through the container's init
    node.process.wait(timeout=30)  # nats-server's status: 1 after SIGTERM, by its design
    log = node.log.read_bytes()
    assert b"changed: reloading" in log
    assert b"Server Exiting" in log  # passed on, not left running
