"""Director-signed desired state (Uptane's director role): sign, verify, match against TUF.

The controller's online *director* key signs each device's desired state in a DSSE
envelope (securesystemslib's :class:`~securesystemslib.dsse.Envelope`): the payload is
the :class:`~models.wire.DesiredState` JSON, so the signed bytes are exactly the bytes
received and no canonical-JSON step can differ between the two sides. Which keys may
sign, and how many must, is part of the TUF root (:data:`DIRECTOR_ROOT_FIELD`), so the
director key is rotated like any other role: by the root keys.

An agent accepts a desired state only when :func:`verify_desired` passes (this device,
newer than the last accepted one, unexpired, signed by a threshold of director keys)
and :func:`check_targets` finds every target it names in freshly verified TUF targets
metadata with the same length and hash. Both are pure: bytes, keys and the clock in, a
verified object or a typed error out; the agent decides and persists around them.

    TrustError (models.trust)      rejected: the same bytes will never verify
    ├── MalformedEnvelope          not a DSSE envelope of a desired state
    ├── SignatureRejected          no threshold of director signatures (or a wrong key)
    ├── WrongDevice                signed for another device
    ├── ReplayedState              not newer than the last state accepted
    ├── ExpiredState               past its expiry
    ├── UnsafeTargetPath           a target path that could leave a store or a URL
    ├── UnknownTarget              names a target absent from the TUF targets metadata
    └── TargetMismatch             the TUF target has another length or hash
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key, Signer

from models.trust import TrustError
from models.wire import DesiredState, TargetRef, WireError, decode

__all__ = [
    "DESIRED_PAYLOAD_TYPE",
    "DIRECTOR_ROOT_FIELD",
    "DirectorKeys",
    "ExpiredState",
    "MalformedEnvelope",
    "ReplayedState",
    "SignatureRejected",
    "TargetInfo",
    "TargetMismatch",
    "TrustError",
    "UnknownTarget",
    "UnsafeTargetPath",
    "WrongDevice",
    "check_target_path",
    "check_targets",
    "director_keys_from_root",
    "director_root_field",
    "key_material",
    "role_with_repeated_key",
    "sign_desired",
    "verify_desired",
]

DESIRED_PAYLOAD_TYPE: Final = "application/vnd.edgefleet.desired-state+json"
DIRECTOR_ROOT_FIELD: Final = "x-edgefleet-director"  # in root.json's "signed" object

_SEGMENT = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")
_MAX_TARGET_PATH = 512


class MalformedEnvelope(TrustError):
    """Not a DSSE envelope carrying a desired state."""


class SignatureRejected(TrustError):
    """Fewer valid director signatures than the threshold."""


class WrongDevice(TrustError):
    """A desired state signed for another device."""


class ReplayedState(TrustError):
    """A desired state no newer than the last one accepted.

    ``again`` tells a retained state delivered once more (the same version) from a
    replay of an older one.
    """

    def __init__(self, message: str, *, again: bool) -> None:
        super().__init__(message)
        self.again = again


class ExpiredState(TrustError):
    """A desired state past its expiry."""


class UnsafeTargetPath(TrustError):
    """A target path with ``..``, an absolute start, a backslash or an encoded separator."""


class UnknownTarget(TrustError):
    """A target the TUF targets metadata does not list."""


class TargetMismatch(TrustError):
    """A target whose TUF entry has another length or sha256 than the desired state says."""


@dataclass(frozen=True)
class DirectorKeys:
    """The keys that may sign desired states, and how many signatures are needed."""

    keys: tuple[Key, ...]
    threshold: int


def director_root_field(keys: Sequence[Key], threshold: int) -> dict[str, Any]:
    """The value the TUF root carries under :data:`DIRECTOR_ROOT_FIELD`."""
    return {"keys": {key.keyid: key.to_dict() for key in keys}, "threshold": threshold}


def key_material(key: Mapping[str, Any]) -> str:
    """What makes two keys the same key, whatever key id lists them (a key's dict form)."""
    return json.dumps([key.get("keytype"), key.get("scheme"), key.get("keyval")], sort_keys=True)


def role_with_repeated_key(root_signed: Mapping[str, Any]) -> str | None:
    """The first role of a root whose key ids name one key twice, or None.

    python-tuf counts signatures per key id, so such a role would let one key meet a
    threshold of 2 alone: roots that do this are refused on both sides.
    """
    keys, roles = root_signed.get("keys"), root_signed.get("roles")
    if not isinstance(keys, Mapping) or not isinstance(roles, Mapping):
        return None
    for name, role in roles.items():
        keyids = role.get("keyids") if isinstance(role, Mapping) else None
        if not isinstance(keyids, list):
            continue
        material = [
            key_material(keys[keyid])
            for keyid in keyids
            if isinstance(keyid, str) and isinstance(keys.get(keyid), Mapping)
        ]
        if len(set(material)) != len(material):
            return str(name)
    return None


def director_keys_from_root(root_signed: Mapping[str, Any]) -> DirectorKeys:
    """The director keys named by a (verified) root's signed object.

    A root without the field names no director, so nothing can verify: fail closed. The
    same key material under two key ids is refused, so it cannot count twice.
    """
    field = root_signed.get(DIRECTOR_ROOT_FIELD)
    if not isinstance(field, Mapping):
        raise SignatureRejected(
            f"the trusted root names no director keys ({DIRECTOR_ROOT_FIELD!r} is missing)"
        )
    try:
        raw_keys = field["keys"]
        threshold = field["threshold"]
        keys = tuple(Key.from_dict(keyid, dict(value)) for keyid, value in raw_keys.items())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SignatureRejected(f"the root's director keys are malformed: {exc!r}") from None
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise SignatureRejected(f"the root's director threshold {threshold!r} is not >= 1")
    material = [key_material(key.to_dict()) for key in keys]
    if len(set(material)) != len(material):
        raise SignatureRejected("the root lists one director key under two key ids")
    if len(keys) < threshold:
        raise SignatureRejected(
            f"the root names {len(keys)} director keys but requires {threshold} signatures"
        )
    return DirectorKeys(keys, threshold)


def sign_desired(state: DesiredState, signers: Sequence[Signer]) -> bytes:
    """The MQTT payload for ``state``: a DSSE envelope signed by each of ``signers``."""
    envelope = Envelope(
        payload=state.model_dump_json(exclude_none=True).encode(),
        payload_type=DESIRED_PAYLOAD_TYPE,
        signatures={},
    )
    for signer in signers:
        envelope.sign(signer)
    return json.dumps(envelope.to_dict(), separators=(",", ":")).encode()


def _envelope(raw: bytes) -> Envelope:
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        envelope = Envelope.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError, sslib_exceptions.FormatError) as exc:
        raise MalformedEnvelope(f"not a signed desired state: {exc!r}") from None
    if envelope.payload_type != DESIRED_PAYLOAD_TYPE:
        raise MalformedEnvelope(
            f"payload type {envelope.payload_type!r} is not {DESIRED_PAYLOAD_TYPE!r}"
        )
    return envelope


def verify_desired(
    raw: bytes,
    director: DirectorKeys,
    *,
    device_id: str,
    last_version: int | None,
    now: datetime,
) -> DesiredState:
    """The desired state in ``raw``, if every check passes; else the first failing check.

    Signatures are checked before anything in the payload is believed.
    """
    envelope = _envelope(raw)
    try:
        envelope.verify(list(director.keys), director.threshold)
    except (sslib_exceptions.VerificationError, ValueError) as exc:
        raise SignatureRejected(f"desired state not signed by the director: {exc}") from None
    try:
        state = decode(DesiredState, envelope.payload)
    except WireError as exc:
        raise MalformedEnvelope(f"signed payload is not a desired state: {exc}") from None
    if state.device_id != device_id:
        raise WrongDevice(f"desired state is for device {state.device_id!r}, not {device_id!r}")
    if last_version is not None and state.version <= last_version:
        raise ReplayedState(
            f"desired state version {state.version} is not newer than {last_version}, "
            "the last one accepted",
            again=state.version == last_version,
        )
    if state.expires <= now:
        raise ExpiredState(f"desired state {state.version} expired at {state.expires}")
    for model in state.models:
        if model.target is not None:
            check_target_path(model.target.path)
    return state


def check_target_path(path: str) -> str:
    """``path`` if it is a plain relative TUF target path (``name/version/file``)."""
    if not path or len(path) > _MAX_TARGET_PATH:
        raise UnsafeTargetPath(f"target path of {len(path)} characters")
    if "%" in path or "\\" in path or path.startswith("/"):
        raise UnsafeTargetPath(f"target path {path!r} has an encoded, back- or leading slash")
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise UnsafeTargetPath(f"target path {path!r} has an unsafe segment {segment!r}")
    return path


class TargetInfo(Protocol):
    """What verified TUF targets metadata says of one target (tuf's ``TargetFile`` fits)."""

    @property
    def length(self) -> int: ...

    @property
    def hashes(self) -> dict[str, str]: ...


def check_targets(wanted: Sequence[TargetRef], verified: Mapping[str, TargetInfo | None]) -> None:
    """Every wanted target is in ``verified`` (path -> TUF entry) with the same length and hash."""
    for ref in wanted:
        check_target_path(ref.path)
        entry = verified.get(ref.path)
        if entry is None:
            raise UnknownTarget(f"target {ref.path!r} is not in the TUF targets metadata")
        signed_hash = entry.hashes.get("sha256")
        if entry.length != ref.length or signed_hash != ref.sha256:
            raise TargetMismatch(
                f"target {ref.path!r}: desired state says {ref.length} bytes, sha256 "
                f"{ref.sha256}; TUF targets metadata says {entry.length} bytes, sha256 "
                f"{signed_hash}"
            )
