"""The broker's rules written as nats-server users, and the file the controller keeps for them."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from pydantic import ValidationError

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.link.acl import AuthFileError
from fleet.link.broker_auth import DeviceCredential, reload_broker, write_auth_files
from fleet.link.nats_auth import NATS_USERS_FILE, render_nats_users
from fleet.link.passwords import hash_bcrypt, hash_password
from tests.polling import wait_until

CTL = "edgefleet-controller"
A, B, C = "dev-aaa", "dev-bbb", "dev-ccc"


def parsed(text: str) -> list[dict[str, Any]]:
    """The users of a rendered file: comment lines, then ``authorization: <JSON>``."""
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    key, _, value = body.partition(":")
    assert key == "authorization"
    users: list[dict[str, Any]] = json.loads(value)["users"]
    return users


def by_name(text: str) -> dict[str, dict[str, Any]]:
    return {user["user"]: user for user in parsed(text)}


def test_a_device_may_touch_its_own_subjects_only_and_over_mqtt_only() -> None:
    users = by_name(render_nats_users(CTL, hash_bcrypt("c"), {A: hash_bcrypt("a")}))
    device = users[A]
    own = f"edgefleet.v1.devices.{A}"
    assert device["permissions"]["publish"]["allow"] == [
        f"{own}.reported",
        f"{own}.telemetry",
        f"{own}.events",
    ]
    # Its downstream topics, and where JetStream delivers its QoS 1 subscriptions.
    assert device["permissions"]["subscribe"]["allow"] == [
        f"{own}.desired",
        f"{own}.cmd",
        "$MQTT.sub.>",
    ]
    assert device["allowed_connection_types"] == ["MQTT"]


def test_the_controller_may_touch_the_edgefleet_tree_and_pull_from_jetstream() -> None:
    controller = by_name(render_nats_users(CTL, hash_bcrypt("c"), {}))[CTL]
    publish = controller["permissions"]["publish"]["allow"]
    assert publish[0] == "edgefleet.v1.>"
    assert "$JS.API.CONSUMER.MSG.NEXT.$MQTT_msgs.*" in publish
    assert "$JS.ACK.$MQTT_msgs.>" in publish
    assert ">" not in publish  # nothing outside its tree and the ingest stream
    assert "allowed_connection_types" not in controller  # MQTT and NATS


def test_the_stored_hash_checks_the_password_and_nothing_else() -> None:
    hashed = by_name(render_nats_users(CTL, hash_bcrypt("c"), {A: hash_bcrypt("pw-a")}))[A][
        "password"
    ]
    assert hashed.startswith("$2a$04$")  # the prefix every nats-server reads; cheap to check
    assert bcrypt.checkpw(b"pw-a", hashed.encode())
    assert not bcrypt.checkpw(b"pw-b", hashed.encode())


@pytest.mark.parametrize(
    ("devices", "extra", "error"),
    [
        ({"dev-x": "$2a$04$short"}, [], "malformed id or bcrypt hash"),
        ({"dev-x\nuser": hash_bcrypt("x")}, [], "malformed id or bcrypt hash"),
        ({CTL: hash_bcrypt("x")}, [], f"given twice: {CTL}"),
        ({}, [{"password": "x"}], "valid 'user' name"),
        ({}, [{"user": CTL, "password": "x"}], f"given twice: {CTL}"),
        ({A: hash_bcrypt("a")}, [{"user": A, "password": "x"}], f"given twice: {A}"),
    ],
)
def test_a_login_that_could_take_another_ones_place_is_refused(
    devices: dict[str, str], extra: list[dict[str, Any]], error: str
) -> None:
    with pytest.raises(AuthFileError, match=error):
        render_nats_users(CTL, hash_bcrypt("c"), devices, extra)


def nats_settings(tmp_path: Path, **more: Any) -> FleetSettings:
    return FleetSettings(
        data_dir=tmp_path / "data",
        broker_url="mqtt://127.0.0.1:1883",
        broker_auth_format="nats",
        **more,
    )


def credential(device_id: str, password: str, **more: Any) -> DeviceCredential:
    fields = {"revoked": False, "bcrypt_hash": hash_bcrypt(password), **more}
    return DeviceCredential(device_id, hash_password(password), **fields)


def test_the_users_file_leaves_out_revoked_devices_and_those_without_a_bcrypt_hash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = tmp_path / "ops.json"
    extra.write_text(json.dumps([{"user": "ops", "password": hash_bcrypt("ops")}]))
    settings = nats_settings(tmp_path, nats_extra_users_file=extra)
    written = write_auth_files(
        settings,
        hash_bcrypt("ctl"),
        [
            credential(A, "a"),
            credential(B, "b", revoked=True),
            credential(C, "c", bcrypt_hash=None),  # enrolled before migration 0009
            credential("dev-bad", "x", bcrypt_hash="plaintext"),
        ],
    )
    assert written.devices == 1
    assert not written.reloaded  # no pid file set
    (users_file,) = written.files
    assert users_file == settings.resolved_auth_dir / NATS_USERS_FILE
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert list(by_name(users_file.read_text())) == [CTL, A, "ops"]
    (said,) = [r.getMessage() for r in caplog.records if "enroll again" in r.getMessage()]
    assert said.startswith("1 device(s) enrolled before NATS logins")
    assert said.endswith(C)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "does not exist"),
        ("{not json", "cannot read"),
        ('{"user": "ops"}', "JSON list of user maps"),
        ('["ops"]', "JSON list of user maps"),
    ],
)
def test_a_bad_extra_users_file_is_a_config_error_and_leaves_the_old_file(
    tmp_path: Path, content: str | None, error: str
) -> None:
    extra = tmp_path / "ops.json"
    if content is not None:
        extra.write_text(content)
    good = nats_settings(tmp_path)
    (users_file,) = write_auth_files(good, hash_bcrypt("ctl"), [credential(A, "a")]).files
    before = users_file.read_text()
    with pytest.raises(ConfigError, match=error):
        write_auth_files(
            nats_settings(tmp_path, nats_extra_users_file=extra), hash_bcrypt("ctl"), []
        )
    assert users_file.read_text() == before


def test_nats_users_need_an_external_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="embedded broker reads Mosquitto's files"):
        FleetSettings(data_dir=tmp_path, broker_auth_format="nats")


@pytest.mark.integration  # runs nats-server
@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
def test_nats_server_accepts_the_file_it_includes(tmp_path: Path) -> None:
    settings = nats_settings(tmp_path)
    (users_file,) = write_auth_files(settings, hash_bcrypt("ctl"), [credential(A, "a")]).files
    config = tmp_path / "data" / "nats.conf"
    config.write_text(f'port: -1\ninclude "{users_file.relative_to(config.parent)}"\n')
    checked = subprocess.run(
        ["nats-server", "-t", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr
    config.write_text('port: -1\ninclude "broker/missing.conf"\n')
    missing = subprocess.run(
        ["nats-server", "-t", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert missing.returncode != 0


@pytest.mark.integration  # starts Python child processes
def test_a_pid_file_pattern_reloads_every_node(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGHUP, lambda *a: pathlib.Path(sys.argv[1]).touch())\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    pids, markers, children = tmp_path / "pids", [], []
    pids.mkdir()
    try:
        for name in ("n1", "n2"):
            marker = tmp_path / f"{name}.hup"
            child = subprocess.Popen(
                [sys.executable, "-c", code, str(marker)], stdout=subprocess.PIPE
            )
            children.append(child)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"ready"
            (pids / f"{name}.pid").write_text(f"{child.pid}\n")
            markers.append(marker)
        (pids / "notes.txt").write_text("not a pid file")
        assert reload_broker(pids / "*.pid")
        for marker in markers:
            wait_until(marker.exists, f"{marker.name} recorded", within_s=5, every_s=0.01)
        assert not reload_broker(tmp_path / "none" / "*.pid")  # nothing matches
        (pids / "n3.pid").write_text("999999999\n")  # one node is gone: said, not hidden
        assert not reload_broker(pids / "*.pid")
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=5)
            assert child.stdout is not None
            child.stdout.close()
