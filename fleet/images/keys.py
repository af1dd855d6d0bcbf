"""The image key: one Ed25519 key that signs image manifests, apart from the TUF keys.

Devices never see it; operators do. Whoever flashes a device checks, with the public
half, that the image is the one the build produced (``edgefleet images verify``), so the
private half may live on the machine that signs releases rather than the build server
(``edgefleet images sign``). Keeping it apart from the TUF keys means a leaked image key
cannot publish model updates, and rotating TUF keys does not invalidate shipped images.

A signature file is a small JSON object, ``{"alg": "ed25519", "keyid": ..., "sig": ...}``.
The signed message is :data:`SIGNING_CONTEXT` followed by the manifest's bytes, so a
signature made for anything else with the same key can never pass as a manifest's.
:func:`check_signature` is pure: bytes and a key in, the signer's key id or a typed
reason (:class:`~fleet.errors.ImageRejected`) out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet.errors import ConfigError, ImageRejected

__all__ = [
    "ALGORITHM",
    "SIGNING_CONTEXT",
    "check_signature",
    "generate_image_key",
    "keyid_of",
    "short_keyid",
    "sign_manifest",
    "signature_keyid",
]

ALGORITHM: Final = "ed25519"
SIGNING_CONTEXT: Final = b"edgefleet-image-manifest-v1\n"
_MAX_SIGNATURE_FILE = 4096  # bytes; a real one is about 170


def generate_image_key() -> tuple[bytes, bytes]:
    """A new image key: (PKCS#8 PEM private key, SubjectPublicKeyInfo PEM public key)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private_pem, _public_pem(private.public_key())


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_key(public_pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the image public key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"the image public key is {type(key).__name__}, not Ed25519")
    return key


def _private_key(private_pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the image private key is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the image private key is {type(key).__name__}, not Ed25519")
    return key


def _keyid(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def keyid_of(public_pem: bytes) -> str:
    """The key id of a public key: the hex sha256 of its 32 raw bytes."""
    return _keyid(_public_key(public_pem))


def short_keyid(keyid: str) -> str:
    """A key id as people compare it: its first 16 hex digits."""
    return f"{keyid[:16]}…" if len(keyid) > 16 else keyid


def sign_manifest(manifest: bytes, private_pem: bytes) -> bytes:
    """The signature file for ``manifest`` (its exact bytes), signed with the image key."""
    key = _private_key(private_pem)
    signature = key.sign(SIGNING_CONTEXT + manifest)
    document = {
        "alg": ALGORITHM,
        "keyid": _keyid(key.public_key()),
        "sig": base64.b64encode(signature).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True, indent=1).encode() + b"\n"


def _parse(signature_file: bytes) -> tuple[str, bytes]:
    """(keyid, raw signature) from a signature file, or why it is not one."""
    if len(signature_file) > _MAX_SIGNATURE_FILE:
        raise ImageRejected(f"the signature file is {len(signature_file)} bytes: not a signature")
    try:
        document = json.loads(signature_file)
    except (ValueError, UnicodeDecodeError):
        raise ImageRejected("the signature file is not JSON: not a manifest signature") from None
    if not isinstance(document, dict) or set(document) != {"alg", "keyid", "sig"}:
        raise ImageRejected("the signature file is not {alg, keyid, sig}: not a manifest signature")
    alg, keyid, sig = document["alg"], document["keyid"], document["sig"]
    if alg != ALGORITHM:
        raise ImageRejected(f"the signature's algorithm is {alg!r}, not {ALGORITHM!r}")
    if not isinstance(keyid, str) or not isinstance(sig, str):
        raise ImageRejected("the signature file's keyid and sig must be strings")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("the signature file's sig is not base64") from None
    if len(raw) != 64:
        raise ImageRejected(f"the signature is {len(raw)} bytes; an Ed25519 signature is 64")
    return keyid, raw


def signature_keyid(signature_file: bytes) -> str:
    """The key id a signature file claims to be from (unverified: for display)."""
    return _parse(signature_file)[0]


def check_signature(manifest: bytes, signature_file: bytes, public_pem: bytes) -> str:
    """The signer's key id, if ``signature_file`` signs ``manifest`` with the key given.

    The checks, in order, each an :class:`ImageRejected` naming what failed: the
    signature file is well formed; it names the expected key (else "signed by another
    key", with both key ids); the signature verifies over exactly these bytes (else the
    manifest changed after it was signed). A bad public key is a :class:`ConfigError`.
    """
    key = _public_key(public_pem)
    expected = _keyid(key)
    claimed, raw = _parse(signature_file)
    if claimed != expected:
        raise ImageRejected(
            f"the manifest is signed by key {short_keyid(claimed)}, but the fleet's image key "
            f"is {short_keyid(expected)}"
        )
    try:
        key.verify(raw, SIGNING_CONTEXT + manifest)
    except InvalidSignature:
        raise ImageRejected(
            "the manifest's signature does not match its contents: it was changed after "
            "it was signed (or the signature was)"
        ) from None
    return expected
