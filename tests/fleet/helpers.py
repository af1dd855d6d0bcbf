"""Building blocks for controller tests: device keys, signed enrollment requests, a clock."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient

from models.device import DeviceReport
from models.wire import enrollment_proof

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


@dataclass
class Clock:
    """A controllable clock for the app (``create_app(clock=...)``)."""

    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def device_report(hostname: str = "edge-1") -> DeviceReport:
    return DeviceReport(
        hostname=hostname,
        os="Linux-6.8-aarch64",
        kernel="6.8.0",
        arch="aarch64",
        cpu_physical_cores=6,
        cpu_logical_cores=6,
        ram_total_bytes=8 * 2**30,
        ram_available_bytes=6 * 2**30,
        is_jetson=True,
        jetson_model="NVIDIA Jetson Orin Nano Developer Kit",
        probed_at=START,
    )


@dataclass
class DeviceKey:
    """A device's Ed25519 key, able to sign enrollment requests."""

    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public(self) -> str:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def request(
        self,
        token: str,
        timestamp: datetime,
        *,
        name: str = "edge-1",
        agent_version: str = "0.1.0",
        sign_token: str | None = None,
        hardware_id: str | None = None,
    ) -> dict[str, Any]:
        """An enrollment request body; ``sign_token`` signs another token (a forgery)."""
        proof = enrollment_proof(sign_token or token, self.public, timestamp)
        extra = {} if hardware_id is None else {"hardware_id": hardware_id}
        return {
            **extra,
            "token": token,
            "public_key": self.public,
            "timestamp": timestamp.isoformat(),
            "signature": base64.b64encode(self.private.sign(proof)).decode(),
            "name": name,
            "agent_version": agent_version,
            "device": device_report(name).model_dump(mode="json"),
        }


def create_token(api: TestClient, **body: Any) -> dict[str, Any]:
    response = api.post("/api/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def create_group(api: TestClient, name: str) -> None:
    response = api.post("/api/v1/groups", json={"name": name})
    assert response.status_code == 201, response.text


def enroll(
    api: TestClient,
    clock: Clock,
    *,
    token: str | None = None,
    key: DeviceKey | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Enroll one device (with a fresh one-use token unless given); returns the response."""
    secret = token or create_token(api, **kw)["secret"]
    response = api.post("/api/v1/enroll", json=(key or DeviceKey()).request(secret, clock.now))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def error(response: Any) -> tuple[int, str, str]:
    """``(status, code, message)`` of an error response, checking its shape on the way."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) - {"field"} == {"code", "message"}, body
    return response.status_code, body["error"]["code"], body["error"]["message"]


def error_field(response: Any) -> str | None:
    """The dotted field an error response names (422s name it when they know it)."""
    field: str | None = response.json()["error"].get("field")
    return field
