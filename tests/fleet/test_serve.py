"""``edgefleet serve`` as a real process, on a real Mosquitto, driven by the real CLI.

The whole admin path end to end: the controller starts, migrates, writes its admin
token; the CLI creates a token; a device enrolls over HTTP and logs in to the broker
with what it got; a desired state set through the CLI reaches the device retained.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from models.director import director_keys_from_root, verify_desired
from models.topics import Channel, DeviceTopic
from models.wire import DesiredState, utc_now
from scripts.servers import Controller, MosquittoBroker, free_port, running_controller
from tests.fleet.helpers import DeviceKey
from tests.polling import wait_until

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


@pytest.fixture
def controller(tmp_path: Path, broker: MosquittoBroker, database_url: str) -> Iterator[Controller]:
    with running_controller(
        tmp_path,
        database_url,
        "--broker", broker.url,
        "--broker-auth-dir", str(broker.auth_dir),
        "--broker-pid-file", str(broker.pid_file),
    ) as running:  # fmt: skip
        yield running


def _enroll(controller: Controller) -> dict[str, Any]:
    token = json.loads(controller.cli("tokens", "create", "--note", "e2e", "--json"))
    assert token["fleet_url"] == controller.url
    enrolled = httpx.post(
        f"{controller.url}/api/v1/enroll",
        json=DeviceKey().request(token["secret"], datetime.now(UTC), name="e2e-board"),
        timeout=10,
    )
    assert enrolled.status_code == 200, enrolled.text
    body: dict[str, Any] = enrolled.json()
    return body


def _login_and_read_desired(enrolled: dict[str, Any], port: int) -> DesiredState:
    """Log in as the device (retrying while the broker reloads its files); read desired.

    The desired state is checked as an agent checks it: signed by the director keys the
    TUF root from the enrollment response names.
    """
    creds, device_id = enrolled["broker"], enrolled["device_id"]
    director = director_keys_from_root(json.loads(enrolled["tuf_root"])["signed"])

    def desired_after_login() -> DesiredState:
        """One try: log in, subscribe, verify the retained desired state."""
        got: list[bytes] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["client_id"])
        client.username_pw_set(creds["username"], creds["password"])
        client.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            wait_until(client.is_connected, "the broker's CONNACK (on paho's thread)", within_s=5)
            client.subscribe(str(DeviceTopic(device_id, Channel.DESIRED)), qos=1)
            wait_until(lambda: got, "the retained desired state", within_s=10)
            return verify_desired(
                got[0], director, device_id=device_id, last_version=None, now=utc_now()
            )
        finally:
            client.loop_stop()
            client.disconnect()

    # A try fails while the broker has not reloaded its password file yet: the connection
    # is refused (OSError), or no CONNACK or no retained message comes (a timed-out wait).
    return wait_until(
        desired_after_login,
        "the device to log in and get its desired state",
        within_s=DEADLINE_S,
        every_s=0.1,
        ignoring=(OSError, AssertionError),
    )


def test_serve_end_to_end(controller: Controller, broker: MosquittoBroker) -> None:
    started = controller.output()
    assert f"API on {controller.url}" in started
    assert f"admin token: {controller.data_dir / 'admin-token'}" in started
    assert broker.url in started
    assert (controller.data_dir / "admin-token").is_file()

    body = _enroll(controller)
    device_id = body["device_id"]
    assert body["broker"]["url"] == broker.url

    out = controller.cli("devices", "desired", device_id, "--model", "minilm@1")
    assert f"{device_id}: desired version 1 published" in out

    state = _login_and_read_desired(body, broker.port)
    assert state.version == 1
    assert [(m.name, m.version) for m in state.models] == [("minilm", "1")]

    listed = json.loads(controller.cli("devices", "list", "--json"))
    assert [d["id"] for d in listed["items"]] == [device_id]
    assert "(external, connected)" in controller.cli("status")

    controller.proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert controller.proc.wait(timeout=20) in {0, -signal.SIGTERM}
    assert "Traceback" not in controller.output()


def test_serve_with_the_embedded_broker(tmp_path: Path) -> None:
    """The one-command default: no external broker, SQLite in the data folder."""
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'controller' / 'fleet.db'}"
    with running_controller(tmp_path, database_url, "--broker-port", str(port)) as controller:
        assert f"MQTT broker (embedded): mqtt://127.0.0.1:{port}" in controller.output()
        # the data folder holds the admin token and every credential hash: owner only
        assert controller.data_dir.stat().st_mode & 0o777 == 0o700
        assert (controller.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
        body = _enroll(controller)
        assert body["broker"]["url"] == f"mqtt://127.0.0.1:{port}"
        controller.cli("devices", "desired", body["device_id"], "--model", "gemma3-270m")
        state = _login_and_read_desired(body, port)
        assert [m.name for m in state.models] == ["gemma3-270m"]
        assert "(embedded, connected)" in controller.cli("status")
