"""Running the ``edgefleet`` CLI against an in-process controller, for the CLI tests.

The CLI's HTTP client is handed the app's TestClient (the ``http`` fixture in
conftest.py) through ``obj={"http": ...}``, so every command runs its real code path
down to the routes and the database.
"""

from __future__ import annotations

import typer
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient

from fleet.cli import app
from tests.fleet.helpers import ADMIN_TOKEN, Clock, DeviceKey

__all__ = ["EDGEFLEET", "cli", "enroll", "ok", "runner"]

runner = CliRunner()
EDGEFLEET = typer.main.get_command(app)  # built once: typer builds it anew on every invoke


def cli(http: TestClient | None, *args: str, token: str | None = ADMIN_TOKEN) -> Result:
    extra = ["--admin-token", token] if token else []
    return runner.invoke(
        EDGEFLEET, [*args, *extra], obj={"http": http} if http else None, catch_exceptions=False
    )


def ok(http: TestClient, *args: str) -> str:
    result = cli(http, *args)
    assert result.exit_code == 0, result.output
    return result.output


def enroll(http: TestClient, clock: Clock, secret: str) -> str:
    response = http.post("/api/v1/enroll", json=DeviceKey().request(secret, clock.now))
    assert response.status_code == 200, response.text
    return str(response.json()["device_id"])
