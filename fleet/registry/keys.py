"""Signing keys for the TUF roles and the director: Ed25519, one PEM file per key.

A :class:`KeyStore` is a folder ``<root>/<role>/<keyid>.pem`` (PKCS#8 PEM, mode 0600,
folders 0700), read through securesystemslib's :class:`CryptoSigner`. The controller's
store is ``<data_dir>/keys``; an offline store (a USB stick, an air-gapped machine) has
the same layout, so the same class writes root or targets keys there at ``keys init``
and the offline machine uses them with ``edgefleet keys sign --key FILE``.

A key file is written with ``O_EXCL`` under a temporary name and renamed into place,
so a private key is never world-readable, not even for an instant, and never half
written. Which keys a role *may* use is decided by the TUF root, not by this folder:
a key found here but absent from the root is simply not used (a key staged for a
rotation that is not published yet, for example).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from fleet.errors import ConfigError, InvalidInput
from fleet.files import PRIVATE_FILE, atomic_write, private_dir

__all__ = [
    "KEY_SUFFIX",
    "ROLES",
    "KeyStore",
    "check_role",
    "generate_signer",
    "load_signer",
    "load_signers",
]

ROLES: Final = ("root", "targets", "snapshot", "timestamp", "director")
KEY_SUFFIX: Final = ".pem"
MAX_KEY_FILE_BYTES: Final = 64 * 1024  # a PEM Ed25519 key is about 120 bytes


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`; :class:`InvalidInput` otherwise."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def generate_signer() -> CryptoSigner:
    """A new Ed25519 key pair; its key id is the TUF default (a hash of the public key)."""
    return CryptoSigner.generate_ed25519()


def _signer_from_pem(pem: bytes, where: str) -> CryptoSigner:
    try:
        private = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{where} is not an unencrypted PKCS#8 PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidInput(f"{where} is not an Ed25519 key")
    return CryptoSigner(private)


def load_signer(path: Path) -> CryptoSigner:
    """The signer in a PEM file named on a command line (an offline key, ``--key FILE``)."""
    try:
        with path.open("rb") as source:
            pem = source.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise InvalidInput(f"{path} is too large to be a key file")
    return _signer_from_pem(pem, str(path))


def load_signers(paths: Iterable[Path]) -> list[CryptoSigner]:
    """Signers from PEM files, refusing the same key given twice (it would count once)."""
    signers: list[CryptoSigner] = []
    seen: set[str] = set()
    for path in paths:
        signer = load_signer(path)
        if signer.public_key.keyid in seen:
            raise InvalidInput(f"{path} is a key already given")
        seen.add(signer.public_key.keyid)
        signers.append(signer)
    return signers


class KeyStore:
    """Private keys by role in ``<root>/<role>/<keyid>.pem``; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def role_dir(self, role: str) -> Path:
        return self.root / check_role(role)

    def path(self, role: str, keyid: str) -> Path:
        if not keyid or not all(c in "0123456789abcdef" for c in keyid):
            raise InvalidInput(f"{keyid[:80]!r} is not a key id (lower-case hex)")
        return self.role_dir(role) / f"{keyid}{KEY_SUFFIX}"

    def add(self, role: str, signer: CryptoSigner) -> Path:
        """Write ``signer``'s private key for ``role`` (0600, atomically); its path."""
        try:
            private_dir(self.role_dir(role))
            final = self.path(role, signer.public_key.keyid)
            atomic_write(final, signer.private_bytes, mode=PRIVATE_FILE)
        except OSError as exc:
            raise ConfigError(f"cannot write a {role} key under {self.root}: {exc}") from None
        return final

    def generate(self, role: str) -> CryptoSigner:
        """A new key for ``role``, written to the store."""
        signer = generate_signer()
        self.add(role, signer)
        return signer

    def keyids(self, role: str) -> list[str]:
        """The key ids this store holds for ``role``, sorted."""
        folder = self.role_dir(role)
        try:
            names = sorted(p.name for p in folder.iterdir() if p.name.endswith(KEY_SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot list the {role} keys in {folder}: {exc}") from None
        return [name.removesuffix(KEY_SUFFIX) for name in names]

    def signers(self, role: str, only: Sequence[str] | None = None) -> list[CryptoSigner]:
        """The store's signers for ``role`` (only those key ids, when given)."""
        wanted = set(only) if only is not None else None
        result = []
        for keyid in self.keyids(role):
            if wanted is not None and keyid not in wanted:
                continue
            path = self.path(role, keyid)
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the key file {path}: {exc}") from None
            try:
                signer = _signer_from_pem(pem, str(path))
            except InvalidInput as exc:
                raise ConfigError(str(exc)) from None
            if signer.public_key.keyid != keyid:
                raise ConfigError(f"{path} holds key {signer.public_key.keyid}, not {keyid}")
            result.append(signer)
        return result

    def public_keys(self, role: str) -> list[SSlibKey]:
        return [signer.public_key for signer in self.signers(role)]

    def remove(self, role: str, keyid: str) -> bool:
        """Delete a retired key; False when the store did not hold it."""
        path = self.path(role, keyid)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ConfigError(f"cannot delete the retired key {path}: {exc}") from None
        return True
