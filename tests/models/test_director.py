"""The director's desired-state signatures and checks: each hostile case gets its typed error."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner

from models.director import (
    DIRECTOR_ROOT_FIELD,
    DirectorKeys,
    ExpiredState,
    MalformedEnvelope,
    ReplayedState,
    SignatureRejected,
    TargetMismatch,
    UnknownTarget,
    UnsafeTargetPath,
    WrongDevice,
    check_target_path,
    check_targets,
    director_keys_from_root,
    director_root_field,
    sign_desired,
    verify_desired,
)
from models.wire import DesiredModel, DesiredState, TargetRef

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
DEVICE = "dev-0001"
SHA = "ab" * 32
TARGET = TargetRef(path="gemma3-270m/1.1/default.gguf", length=1234, sha256=SHA)
DIRECTOR = CryptoSigner.generate_ed25519()
OTHER = CryptoSigner.generate_ed25519()
KEYS = DirectorKeys((DIRECTOR.public_key,), 1)


def state(version: int = 5, device: str = DEVICE, expires: datetime | None = None) -> DesiredState:
    return DesiredState(
        device_id=device,
        version=version,
        issued_at=NOW,
        expires=expires or NOW + timedelta(days=1),
        models=[DesiredModel(name="gemma3-270m", version="1.1", target=TARGET)],
    )


def verify(raw: bytes, keys: DirectorKeys = KEYS, last: int | None = 4) -> DesiredState:
    return verify_desired(raw, keys, device_id=DEVICE, last_version=last, now=NOW)


def test_a_signed_state_for_this_device_verifies_to_the_same_state() -> None:
    assert verify(sign_desired(state(), [DIRECTOR])) == state()


def test_the_first_state_verifies_without_a_previous_version() -> None:
    assert verify(sign_desired(state(1), [DIRECTOR]), last=None).version == 1


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", MalformedEnvelope),
        (b"[]", MalformedEnvelope),
        (json.dumps(state().model_dump(mode="json")).encode(), MalformedEnvelope),  # unsigned
        (sign_desired(state(), []), SignatureRejected),  # an envelope without signatures
        (sign_desired(state(), [OTHER]), SignatureRejected),  # the wrong key
        (sign_desired(state(device="dev-9999"), [DIRECTOR]), WrongDevice),
        (sign_desired(state(4), [DIRECTOR]), ReplayedState),  # as old as the last accepted
        (sign_desired(state(3), [DIRECTOR]), ReplayedState),  # older
        (sign_desired(state(expires=NOW - timedelta(seconds=1)), [DIRECTOR]), ExpiredState),
    ],
)
def test_hostile_desired_states_are_refused_with_their_reason(
    raw: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        verify(raw)


def _tamper(raw: bytes, **changes: object) -> bytes:
    envelope = json.loads(raw)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload.update(changes)
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(envelope).encode()


def test_a_payload_changed_after_signing_is_refused() -> None:
    raw = sign_desired(state(), [DIRECTOR])
    with pytest.raises(SignatureRejected):
        verify(_tamper(raw, version=99))


def test_another_payload_type_is_refused_even_when_signed() -> None:
    envelope = json.loads(sign_desired(state(), [DIRECTOR]))
    envelope["payloadType"] = "application/vnd.in-toto+json"
    with pytest.raises(MalformedEnvelope):
        verify(json.dumps(envelope).encode())


def test_a_threshold_of_two_needs_two_distinct_keys() -> None:
    keys = DirectorKeys((DIRECTOR.public_key, OTHER.public_key), 2)
    assert verify(sign_desired(state(), [DIRECTOR, OTHER]), keys).version == 5
    with pytest.raises(SignatureRejected):
        verify(sign_desired(state(), [DIRECTOR]), keys)
    doubled = json.loads(sign_desired(state(), [DIRECTOR]))
    doubled["signatures"] *= 2  # the same signature twice does not make two
    with pytest.raises((SignatureRejected, MalformedEnvelope)):
        verify(json.dumps(doubled).encode(), keys)


def test_root_field_round_trips_and_refuses_one_key_under_two_ids() -> None:
    field_value = director_root_field([DIRECTOR.public_key, OTHER.public_key], 2)
    keys = director_keys_from_root({DIRECTOR_ROOT_FIELD: field_value})
    assert {k.keyid for k in keys.keys} == {DIRECTOR.public_key.keyid, OTHER.public_key.keyid}
    assert keys.threshold == 2
    twice = {"keys": {"id-1": DIRECTOR.public_key.to_dict(), "id-2": DIRECTOR.public_key.to_dict()}}
    with pytest.raises(SignatureRejected, match="two key ids"):
        director_keys_from_root({DIRECTOR_ROOT_FIELD: {**twice, "threshold": 2}})


@pytest.mark.parametrize(
    "root_signed",
    [
        {},  # a root that names no director: nothing can verify
        {DIRECTOR_ROOT_FIELD: {"keys": {}, "threshold": 1}},
        {DIRECTOR_ROOT_FIELD: {"keys": "nope", "threshold": 1}},
        {DIRECTOR_ROOT_FIELD: {"keys": {}, "threshold": 0}},
    ],
)
def test_a_root_without_usable_director_keys_fails_closed(root_signed: dict[str, object]) -> None:
    with pytest.raises(SignatureRejected):
        director_keys_from_root(root_signed)


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "gemma/../../x.gguf",
        "gemma/%2e%2e/x.gguf",
        "gemma%2fx.gguf",
        "gemma\\x.gguf",
        "gemma//x.gguf",
        ".hidden/x.gguf",
        "",
    ],
)
def test_unsafe_target_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafeTargetPath):
        check_target_path(path)


def test_a_signed_state_naming_an_unsafe_path_is_refused() -> None:
    bad = TargetRef(path="../../x.gguf", length=1, sha256=SHA)
    desired = state().model_copy(update={"models": [DesiredModel(name="m", target=bad)]})
    with pytest.raises(UnsafeTargetPath):
        verify(sign_desired(desired, [DIRECTOR]))


@dataclass
class Entry:
    length: int
    hashes: dict[str, str] = field(default_factory=dict)


def test_targets_must_be_listed_with_the_same_length_and_hash() -> None:
    check_targets([TARGET], {TARGET.path: Entry(1234, {"sha256": SHA})})
    with pytest.raises(UnknownTarget):
        check_targets([TARGET], {})
    with pytest.raises(UnknownTarget):
        check_targets([TARGET], {TARGET.path: None})
    with pytest.raises(TargetMismatch):
        check_targets([TARGET], {TARGET.path: Entry(1234, {"sha256": "cd" * 32})})
    with pytest.raises(TargetMismatch):
        check_targets([TARGET], {TARGET.path: Entry(1235, {"sha256": SHA})})
