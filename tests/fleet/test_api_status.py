"""Health, readiness, status, admin authentication, the error shape and the app's lifespan."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from fleet.app import create_app, load_admin_token
from fleet.config import FleetSettings
from fleet.db import head_revision, make_engine
from fleet.errors import ConfigError
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN, ADMIN_TOKEN, Clock, enroll, error

PUBLIC = {
    ("POST", "/api/v1/enroll"),
    ("POST", "/api/v1/enroll/check"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}
DEVICE = {
    ("GET", "/api/v1/artifacts/{sha256}"),
    ("HEAD", "/api/v1/artifacts/{sha256}"),
    ("GET", "/api/v1/tuf/{filename}"),
}


def test_healthz_and_readyz(api: TestClient, link: FakeLink) -> None:
    assert api.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
    ready = api.get("/readyz", headers={"Authorization": ""})
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "reasons": []}
    link.broker_down = True
    not_ready = api.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not_ready"
    assert "MQTT broker" in not_ready.json()["reasons"][0]


def test_database_outage_fails_readyz_and_requests_with_503(
    tmp_path: Path, link: FakeLink, clock: Clock
) -> None:
    settings = FleetSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    app = create_app(settings, link.factory(), clock=clock)
    unreachable = make_engine("postgresql://x@127.0.0.1:1/none?connect_timeout=2")
    with TestClient(app, headers=ADMIN) as client:
        app.state.fleet = dataclasses.replace(app.state.fleet, engine=unreachable)
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "database" in response.json()["reasons"][0]
        devices = client.get("/api/v1/devices")
        assert error(devices)[:2] == (503, "database_unavailable")
        assert devices.headers["retry-after"] == "5"
    unreachable.dispose()


def test_status(api: TestClient, clock: Clock, link: FakeLink, database_url: str) -> None:
    enroll(api, clock)
    link.stats.received, link.stats.stored = 7, 5
    status = api.get("/api/v1/status").json()
    assert status["link"]["connected"] is True
    assert status["link"]["received"] == 7
    assert status["link"]["stored"] == 5
    assert status["link"]["broker_url"].startswith("mqtt://")
    assert status["devices"] == {"total": 1, "online": 0, "offline": 1, "revoked": 0}
    assert status["database"]["revision"] == status["database"]["head"] == head_revision()
    assert status["database"]["dialect"] == database_url.split(":")[0].split("+")[0]
    assert status["wire_schema_version"] == 1
    assert status["public_url"] == "https://fleet.example.com"


def test_every_admin_route_needs_the_admin_token(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    routes = [(method.upper(), path) for path, ops in paths.items() for method in ops]
    admin_routes = [r for r in routes if r not in PUBLIC | DEVICE]
    assert set(routes) >= DEVICE
    for method, path in DEVICE:  # a device's Basic credentials, or the admin token
        response = api.request(
            method, path.replace("{sha256}", "0" * 64), headers={"Authorization": ""}
        )
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith("Basic")
    assert len(admin_routes) >= 20
    for method, path in admin_routes:
        url = path.replace("{device_id}", "dev-0000000000000000").replace("{name}", "g")
        url = url.replace("{token_id}", "tok-0")
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token"}):
            response = api.request(method, url, headers=headers)
            assert error(response)[:2] == (401, "unauthorized"), (method, url, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    assert api.get("/api/v1/devices", headers={"Authorization": "Basic abc"}).status_code == 401


def test_unknown_routes_and_methods_use_the_error_shape(api: TestClient) -> None:
    assert error(api.get("/api/v1/nothing-here"))[:2] == (404, "not_found")
    assert error(api.put("/healthz"))[:2] == (405, "method_not_allowed")


def test_the_link_is_entered_and_left_with_the_app(
    settings: FleetSettings, link: FakeLink, clock: Clock
) -> None:
    app = create_app(settings, link.factory(), clock=clock)
    assert link.entered == 0  # nothing happens at build time
    with TestClient(app):
        assert (link.entered, link.exited) == (1, 0)
        assert link.settings is settings
    assert (link.entered, link.exited) == (1, 1)


def test_admin_token_is_generated_once_with_0600(tmp_path: Path, database_url: str) -> None:
    settings = FleetSettings(data_dir=tmp_path / "data", database_url=database_url)
    link = FakeLink()
    with TestClient(create_app(settings, link.factory())) as client:
        path = tmp_path / "data" / "admin-token"
        token = path.read_text().strip()
        assert len(token) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ok = client.get("/api/v1/groups", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    with TestClient(create_app(settings, FakeLink().factory())):
        assert path.read_text().strip() == token  # kept across restarts


@pytest.mark.usefixtures("permissive_umask")
def test_the_default_sqlite_database_is_owner_only_once_the_app_runs(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path / "data", admin_token=SecretStr(ADMIN_TOKEN))
    with TestClient(create_app(settings, FakeLink().factory()), headers=ADMIN) as client:
        assert client.post("/api/v1/groups", json={"name": "lab"}).status_code == 201
        db = tmp_path / "data" / "fleet.db"
        files = [db, db.with_name("fleet.db-wal"), db.with_name("fleet.db-shm")]
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {
            "fleet.db": 0o600,
            "fleet.db-wal": 0o600,
            "fleet.db-shm": 0o600,
        }


def test_configured_admin_token_must_be_long(tmp_path: Path) -> None:
    short = FleetSettings(data_dir=tmp_path, admin_token=SecretStr("short"))
    with pytest.raises(ConfigError, match="16 characters"):
        load_admin_token(short)


def test_empty_admin_token_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_admin_token(FleetSettings(data_dir=tmp_path))


def test_missing_broker_ca_file_stops_startup(tmp_path: Path, link: FakeLink) -> None:
    settings = FleetSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        broker_ca_file=tmp_path / "missing.pem",
    )
    with (
        pytest.raises(ConfigError, match="broker_ca_file"),
        TestClient(create_app(settings, link.factory())),
    ):
        pass
    assert link.entered == 0


def test_oversized_bodies_are_refused_unread(api: TestClient) -> None:
    huge = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    response = api.post(
        "/api/v1/enroll", content=huge, headers={"Content-Type": "application/json"}
    )
    assert error(response)[:2] == (413, "too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield b" " * (512 * 1024)

    streamed = api.post(
        "/api/v1/enroll", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert error(streamed)[:2] == (413, "too_large")
