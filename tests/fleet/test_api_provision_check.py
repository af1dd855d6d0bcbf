"""POST /api/v1/enroll/check: would a token enroll a device, and what does an image trust.

Provisioning calls it on the operator's bench before writing a token into an image.
It must refuse exactly what enrollment refuses, with the same reasons, and never
spend a use. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.app import create_app
from fleet.config import FleetSettings
from fleet.tables import EnrollmentToken
from models.paths import PROVISION_CHECK_PATH
from models.wire import ProvisionCheckResponse
from tests.fakes.fleet_link import FakeLink
from tests.fleet.helpers import (
    ADMIN,
    ADMIN_TOKEN,
    Clock,
    DeviceKey,
    create_group,
    create_token,
    enroll,
    error,
)

ANONYMOUS = {"Authorization": ""}


def check(api: TestClient, secret: str) -> Any:
    return api.post(PROVISION_CHECK_PATH, json={"token": secret}, headers=ANONYMOUS)


def uses_left(engine: Engine, token_id: str) -> int:
    with Session(engine) as session:
        token = session.get(EnrollmentToken, token_id)
        assert token is not None
        return token.uses_left


def test_a_good_token_is_described_with_what_an_image_trusts(
    api: TestClient, clock: Clock, engine: Engine, link: FakeLink
) -> None:
    create_group(api, "lab")
    token = create_token(api, group="lab", uses=2, expires_in_s=3600)

    response = check(api, token["secret"])

    assert response.status_code == 200, response.text
    body = ProvisionCheckResponse.model_validate(response.json())
    assert (body.token_id, body.group, body.uses_left) == (token["id"], "lab", 2)
    assert body.expires_at is not None
    assert body.expires_at.isoformat().startswith(token["expires_at"][:19])
    assert body.broker_url == "mqtts://broker.example.com:8883"  # as devices see it
    assert body.broker_ca_pem is None
    served = api.get("/api/v1/tuf/1.root.json")  # what devices fetch, byte for byte
    assert served.status_code == 200
    assert body.tuf_root == served.text
    assert json.loads(body.tuf_root)["signed"]["_type"] == "root"
    # nothing was spent, nothing touched the broker, and the token still enrolls
    assert uses_left(engine, token["id"]) == 2
    assert link.sync_auth_count == 0
    for _ in range(3):
        assert check(api, token["secret"]).json()["uses_left"] == 2
    enroll(api, clock, token=token["secret"])
    assert check(api, token["secret"]).json()["uses_left"] == 1


def test_a_token_that_never_expires_says_so(api: TestClient) -> None:
    body = check(api, create_token(api, expires_in_s=None)["secret"]).json()
    assert body["expires_at"] is None
    assert body["group"] is None


def _reason_from_enroll(api: TestClient, clock: Clock, secret: str) -> tuple[int, str, str]:
    return error(api.post("/api/v1/enroll", json=DeviceKey().request(secret, clock.now)))


@pytest.mark.parametrize("why", ["unknown", "used", "expired", "revoked"])
def test_a_bad_token_is_refused_as_enrollment_refuses_it(
    api: TestClient, clock: Clock, engine: Engine, why: str
) -> None:
    token = create_token(api, expires_in_s=60)
    secret = token["secret"]
    if why == "unknown":
        secret = "eft_not-a-real-token"
    elif why == "used":
        enroll(api, clock, token=secret)
    elif why == "expired":
        clock.advance(seconds=61)
    else:
        assert api.delete(f"/api/v1/tokens/{token['id']}").status_code == 200
    before = uses_left(engine, token["id"])

    refused = error(check(api, secret))

    assert refused == _reason_from_enroll(api, clock, secret)
    assert refused[:2] == (403, "enrollment_rejected")
    assert {"unknown": "unknown enrollment token", "used": "used up"}.get(why, why) in refused[2]
    assert uses_left(engine, token["id"]) == before


@pytest.mark.parametrize(
    "body",
    [{}, {"token": ""}, {"token": "x" * 257}, {"token": 5}],
    ids=["missing", "empty", "too-long", "not-a-string"],
)
def test_a_malformed_check_is_422(api: TestClient, body: dict[str, Any]) -> None:
    status, code, _ = error(api.post(PROVISION_CHECK_PATH, json=body, headers=ANONYMOUS))
    assert (status, code) == (422, "invalid_input")


def test_an_oversized_check_is_refused_unread(api: TestClient) -> None:
    huge = b'{"token": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = api.post(
        PROVISION_CHECK_PATH,
        content=huge,
        headers={**ANONYMOUS, "Content-Type": "application/json"},
    )
    assert error(response)[:2] == (413, "too_large")


def test_the_broker_ca_is_handed_out_when_the_broker_speaks_tls(
    tmp_path: Path, database_url: str, link: FakeLink, clock: Clock
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    settings = FleetSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        admin_token=SecretStr(ADMIN_TOKEN),
        broker_url="mqtts://broker.test:8883",
        broker_ca_file=ca,
    )
    with TestClient(create_app(settings, link.factory(), clock=clock), headers=ADMIN) as api:
        body = check(api, create_token(api)["secret"]).json()
        enrolled = enroll(api, clock)
    assert body["broker_ca_pem"] == ca.read_text() == enrolled["broker"]["ca_pem"]
    assert body["broker_url"] == "mqtts://broker.test:8883" == enrolled["broker"]["url"]
