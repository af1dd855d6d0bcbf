"""The broker's rules as a pure function, and the files that render them for Mosquitto."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from fleet.config import FleetSettings
from fleet.link.acl import (
    Access,
    AuthFileError,
    acl_allows,
    parse_password_file,
    render_acl_file,
    render_password_file,
)
from fleet.link.broker_auth import (
    ACL_FILE,
    PASSWORD_FILE,
    DeviceCredential,
    controller_password,
    reload_broker,
    write_auth_files,
)
from fleet.link.passwords import hash_password, verify_password
from tests.polling import wait_until

CTL = "edgefleet-controller"
A = "dev-aaa"
B = "dev-bbb"


def topic(device: str, channel: str) -> str:
    return f"edgefleet/v1/devices/{device}/{channel}"


def allows(user: str | None, where: str, access: Access) -> bool:
    return acl_allows(user, where, access, controller=CTL)


@pytest.mark.parametrize("channel", ["reported", "telemetry", "events"])
def test_device_writes_only_its_own_upstream_channels(channel: str) -> None:
    assert allows(A, topic(A, channel), Access.WRITE)
    assert not allows(A, topic(B, channel), Access.WRITE)
    assert not allows(A, topic(A, channel), Access.READ)
    assert not allows(A, topic(A, channel), Access.SUBSCRIBE)


@pytest.mark.parametrize("channel", ["desired", "cmd"])
def test_device_reads_only_its_own_downstream_channels(channel: str) -> None:
    assert allows(A, topic(A, channel), Access.SUBSCRIBE)
    assert allows(A, topic(A, channel), Access.READ)
    assert not allows(A, topic(A, channel), Access.WRITE)
    assert not allows(A, topic(B, channel), Access.SUBSCRIBE)
    assert not allows(A, topic(B, channel), Access.READ)


@pytest.mark.parametrize(
    "pattern",
    [
        "#",
        "edgefleet/#",
        "edgefleet/v1/#",
        "edgefleet/v1/devices/+/desired",
        f"edgefleet/v1/devices/{A}/+",
        f"edgefleet/v1/devices/{A}/#",
        "$SYS/#",
        f"$share/g/edgefleet/v1/devices/{A}/desired",
    ],
)
def test_device_cannot_use_wildcards_or_shares(pattern: str) -> None:
    assert not allows(A, pattern, Access.SUBSCRIBE)


def test_controller_owns_the_tree_and_nothing_else() -> None:
    for access in Access:
        assert allows(CTL, topic(A, "telemetry"), access)
        assert allows(CTL, topic(B, "desired"), access)
        assert not allows(CTL, "other/topic", access)
    assert allows(CTL, "edgefleet/v1/devices/+/reported", Access.SUBSCRIBE)
    assert allows(CTL, "edgefleet/v1/#", Access.SUBSCRIBE)
    assert allows(CTL, "$share/fleet/edgefleet/v1/devices/+/telemetry", Access.SUBSCRIBE)
    assert not allows(CTL, "#", Access.SUBSCRIBE)
    assert not allows(CTL, "edgefleet/+/devices/x/desired", Access.SUBSCRIBE)
    assert not allows(CTL, "edgefleet/v1/devices/+/reported", Access.WRITE)  # no wildcard publish
    assert not allows(CTL, "edgefleet/v1/a#", Access.SUBSCRIBE)


@pytest.mark.parametrize("user", [None, "", "Not-A-Device", "a/b", "x+", "#"])
def test_strangers_get_nothing(user: str | None) -> None:
    for access in Access:
        assert not allows(user, topic(A, "desired"), access)
        assert not allows(user, topic(A, "telemetry"), access)


def test_password_file_renders_and_parses_back() -> None:
    ctl_hash = hash_password("ctl")
    a_hash = hash_password("a")
    text = render_password_file(CTL, ctl_hash, {A: a_hash})
    users = parse_password_file(text.splitlines())
    assert users == {CTL: ctl_hash, A: a_hash}
    assert verify_password("a", users[A])
    assert text.splitlines()[-2].startswith(f"{CTL}:")  # the controller first


def test_password_file_refuses_lines_that_could_break_it() -> None:
    good = hash_password("x")
    with pytest.raises(AuthFileError):
        render_password_file(CTL, good, {CTL: good})  # a device logging in as the controller
    with pytest.raises(AuthFileError):
        render_password_file(CTL, good, {A: good + "\nroot:" + good})
    with pytest.raises(AuthFileError):
        render_password_file("bad:name", good, {})


def test_acl_file_is_the_same_rules_for_mosquitto() -> None:
    lines = [
        line for line in render_acl_file(CTL).splitlines() if line and not line.startswith("#")
    ]
    assert lines == [
        f"user {CTL}",
        "topic readwrite edgefleet/v1/#",
        "pattern write edgefleet/v1/devices/%u/reported",
        "pattern write edgefleet/v1/devices/%u/telemetry",
        "pattern write edgefleet/v1/devices/%u/events",
        "pattern read edgefleet/v1/devices/%u/desired",
        "pattern read edgefleet/v1/devices/%u/cmd",
    ]


def settings_for(tmp_path: Path, **overrides: object) -> FleetSettings:
    return FleetSettings(data_dir=tmp_path / "data", **overrides)  # type: ignore[arg-type]


def test_auth_files_leave_out_revoked_and_malformed_devices(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    good = hash_password("pw")
    files = write_auth_files(
        settings,
        hash_password("ctl"),
        [
            DeviceCredential(A, good, revoked=False),
            DeviceCredential(B, good, revoked=True),
            DeviceCredential("dev-bad", "plaintext", revoked=False),
            DeviceCredential(CTL, good, revoked=False),
        ],
    )
    assert files.devices == 1
    assert not files.reloaded
    _, password_file = files.files  # the ACL first
    users = parse_password_file(password_file.read_text().splitlines())
    assert set(users) == {CTL, A}
    for path in files.files:
        assert path.parent == settings.resolved_auth_dir
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {p.name for p in settings.resolved_auth_dir.iterdir()} == {PASSWORD_FILE, ACL_FILE}


def test_controller_password_is_generated_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    first = controller_password(settings)
    assert len(first) >= 24
    assert controller_password(settings) == first
    stored = settings.data_dir / "broker-password"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    configured = settings_for(tmp_path, broker_password=SecretStr("given"))
    assert controller_password(configured) == "given"


@pytest.mark.integration  # starts a Python child process
def test_reload_signals_the_pid_in_the_pid_file(tmp_path: Path) -> None:
    # A child that records SIGHUP, standing in for a broker.
    marker = tmp_path / "hup"
    code = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(marker)!r}).touch())\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        pid_file = tmp_path / "broker.pid"
        pid_file.write_text(f"{child.pid}\n")
        assert reload_broker(pid_file)
        wait_until(marker.exists, "the child to record SIGHUP", within_s=5, every_s=0.01)
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=5)
        assert child.stdout is not None
        child.stdout.close()


@pytest.mark.integration  # starts a Python child process, to have a dead pid
def test_reload_without_a_broker_is_a_warning_not_an_error(tmp_path: Path) -> None:
    assert not reload_broker(None)
    assert not reload_broker(tmp_path / "missing.pid")
    (tmp_path / "junk.pid").write_text("not a pid")
    assert not reload_broker(tmp_path / "junk.pid")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "dead.pid").write_text(str(dead.pid))
    assert not reload_broker(tmp_path / "dead.pid")
