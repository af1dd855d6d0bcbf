"""The contract: topics, wire messages, the enrollment proof, and the generated docs."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from models import protocol_doc
from models.device import DeviceReport
from models.topics import (
    Channel,
    DeviceTopic,
    TopicError,
    shared_subscription,
    subscription,
    validate_device_id,
)
from models.trust import TrustError, verify_enrollment
from models.wire import (
    MAX_PAYLOAD_BYTES,
    EnrollmentRequest,
    TelemetryBatch,
    WireError,
    decode,
    encode,
    enrollment_proof,
)

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def test_topic_round_trip() -> None:
    topic = DeviceTopic("dev-abc123", Channel.TELEMETRY)
    assert str(topic) == "edgefleet/v1/devices/dev-abc123/telemetry"
    assert DeviceTopic.parse(str(topic)) == topic
    assert subscription(Channel.REPORTED) == "edgefleet/v1/devices/+/reported"
    assert shared_subscription("ingest", Channel.EVENTS) == (
        "$share/ingest/edgefleet/v1/devices/+/events"
    )


@pytest.mark.parametrize(
    "device_id", ["", "ab", "Dev-1", "dev/1", "dev+", "dev#", "-dev", "d" * 64, "dev 1"]
)
def test_device_ids_that_could_break_topics_are_refused(device_id: str) -> None:
    with pytest.raises(TopicError):
        validate_device_id(device_id)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v1/devices/dev-abc/unknown",
        "edgefleet/v1/devices/dev-abc/telemetry/extra",
        "edgefleet/v2/devices/dev-abc/telemetry",
        "edgefleet/v1/devices/+/telemetry",
        "other/dev-abc/telemetry",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        DeviceTopic.parse(topic)


def _batch(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "schema_version": 1,
        "device_id": "dev-abc123",
        "id": "a" * 32,
        "samples": [
            {
                "id": "b" * 32,
                "seq": 1,
                "ts": NOW.isoformat(),
                "window_s": 10,
                "requests": 3,
                "errors": 0,
                "rejections": 0,
            }
        ],
    }
    body.update(overrides)
    return body


def test_decode_accepts_a_valid_batch_and_ignores_unknown_fields() -> None:
    batch = decode(TelemetryBatch, json.dumps(_batch(future_field=1)).encode())
    assert batch.samples[0].requests == 3
    assert decode(TelemetryBatch, encode(batch)) == batch


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe garbage", "invalid TelemetryBatch"),
        (json.dumps(_batch()).encode()[:40], "invalid TelemetryBatch"),
        (json.dumps(_batch(samples="many")).encode(), "samples"),
        (json.dumps(_batch(samples=[])).encode(), "samples"),
        (json.dumps(_batch(schema_version=2)).encode(), "schema_version"),
        (json.dumps(_batch(device_id="../etc")).encode(), "device_id"),
        (b"[" * (MAX_PAYLOAD_BYTES + 1), "exceeds"),
    ],
)
def test_decode_rejects_bad_payloads_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode(TelemetryBatch, payload)


def _device() -> DeviceReport:
    return DeviceReport(
        hostname="h",
        os="Linux",
        kernel="6",
        arch="x86_64",
        cpu_physical_cores=2,
        cpu_logical_cores=2,
        ram_total_bytes=1,
        ram_available_bytes=1,
    )


def _signed(
    key: Ed25519PrivateKey, token: str = "eft_secret", at: datetime = NOW
) -> EnrollmentRequest:
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    signature = key.sign(enrollment_proof(token, public.decode(), at))
    return EnrollmentRequest(
        token=token,
        public_key=public.decode(),
        timestamp=at,
        signature=base64.b64encode(signature).decode(),
        name="h",
        agent_version="0.1.0",
        device=_device(),
    )


def test_enrollment_proof_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    raw = verify_enrollment(_signed(key), now=NOW + timedelta(seconds=30))
    assert raw == key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_enrollment_with_another_token_or_key_fails() -> None:
    key = Ed25519PrivateKey.generate()
    request = _signed(key)
    with pytest.raises(TrustError, match="signature"):
        verify_enrollment(request.model_copy(update={"token": "eft_other"}), now=NOW)
    other = _signed(Ed25519PrivateKey.generate())
    with pytest.raises(TrustError, match="signature"):
        verify_enrollment(request.model_copy(update={"public_key": other.public_key}), now=NOW)


def test_stale_enrollment_is_refused() -> None:
    request = _signed(Ed25519PrivateKey.generate(), at=NOW - timedelta(minutes=6))
    with pytest.raises(TrustError, match="clock"):
        verify_enrollment(request, now=NOW)


def test_malformed_key_is_refused() -> None:
    request = _signed(Ed25519PrivateKey.generate())
    bad = request.model_copy(update={"public_key": "!" * 44})
    with pytest.raises(TrustError, match="base64"):
        verify_enrollment(bad, now=NOW)


def test_protocol_doc_is_generated_from_the_models() -> None:
    committed = (REPO / "docs" / "protocol.md").read_text()
    assert committed == protocol_doc.render(), (
        "docs/protocol.md is stale: run `python -m models.protocol_doc > docs/protocol.md`"
    )
