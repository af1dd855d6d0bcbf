"""Fixtures for the controller's API tests: an app on a real database with a fake link.

``api`` runs every test that uses it twice, on SQLite and on PostgreSQL (through
the suite's ``database_url`` fixture); its client sends the admin token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from fleet.app import create_app
from fleet.config import FleetSettings
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import ADMIN, ADMIN_TOKEN, Clock


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A umask that lets everyone read new files: modes must not depend on the caller's."""
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> FleetSettings:
    return FleetSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        admin_token=SecretStr(ADMIN_TOKEN),
        broker_url="mqtt://broker.test:1883",
        broker_public_url="mqtts://broker.example.com:8883",
        public_url="https://fleet.example.com",
        telemetry_interval_s=5.0,
        heartbeat_interval_s=20.0,
    )


@pytest.fixture
def api(settings: FleetSettings, link: FakeLink, clock: Clock) -> Iterator[TestClient]:
    """A client of a running app (lifespan entered), authenticated as the admin."""
    app = create_app(settings, link.factory(), clock=clock)
    with TestClient(app, headers=ADMIN) as client:
        yield client


@pytest.fixture
def engine(api: TestClient, link: FakeLink) -> Engine:
    """The running app's engine, for inserting rows the MQTT ingest would write."""
    assert link.engine is not None
    return link.engine


@pytest.fixture
def http(tmp_path: Path, link: FakeLink, clock: Clock) -> Iterator[TestClient]:
    """An app's client (SQLite) that sends no credentials of its own: the CLI must add them."""
    settings = FleetSettings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        admin_token=SecretStr(ADMIN_TOKEN),
        public_url="https://fleet.example.com",
    )
    with TestClient(create_app(settings, link.factory(), clock=clock)) as client:
        yield client
