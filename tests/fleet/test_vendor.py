"""The dashboard's asset fetcher against a fake npm registry (httpx.MockTransport)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fleet.dashboard import vendor
from fleet.dashboard.vendor import (
    VENDOR_FILES,
    IntegrityMismatch,
    LockedPackage,
    LockfileInvalid,
    NotOnRegistry,
    RegistryUnavailable,
    TarballInvalid,
    VendorConfig,
)
from fleet.errors import Rejected, Transient

REGISTRY = "https://npm.test"
VERSIONS = {
    "htmx.org": "2.0.11",
    "htmx-ext-sse": "2.2.4",
    "uplot": "1.6.32",
    "@picocss/pico": "2.1.1",
}
ALL_NAMES = sorted(n for files in VENDOR_FILES.values() for n in files.values())


def make_tarball(
    files: dict[str, bytes], *, extra: Callable[[tarfile.TarFile], None] | None = None
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(f"package/{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(archive)
    return buffer.getvalue()


def package_files(name: str) -> dict[str, bytes]:
    files = {path: f"/* {name} {path} */".encode() for path in VENDOR_FILES[name]}
    return {**files, "README.md": b"not wanted", "package.json": b"{}"}


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def url_of(name: str) -> str:
    return f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{VERSIONS[name]}.tgz"


@dataclass
class FakeRegistry:
    """Serves tarballs by URL and counts requests; ``served`` overrides the bytes sent."""

    tarballs: dict[str, bytes] = field(default_factory=dict)
    served: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    fail: Callable[[httpx.Request], httpx.Response] | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requests.append(url)
        if self.fail is not None:
            return self.fail(request)
        if url in self.served:
            return httpx.Response(200, content=self.served[url])
        if url in self.tarballs:
            return httpx.Response(200, content=self.tarballs[url])
        return httpx.Response(404)


@dataclass
class World:
    registry: FakeRegistry
    config: VendorConfig
    client: httpx.Client
    tmp: Path

    def write_lockfile(self, tarballs: dict[str, bytes], *, omit: str | None = None) -> None:
        packages: dict[str, object] = {"": {"name": "assets", "version": "0.0.0"}}
        for name, data in tarballs.items():
            if name != omit:
                packages[f"node_modules/{name}"] = {
                    "version": VERSIONS[name],
                    "integrity": integrity(data),
                }
        document = {"name": "assets", "lockfileVersion": 3, "requires": True, "packages": packages}
        self.config.lockfile.write_text(json.dumps(document), encoding="utf-8")

    def install(self) -> bool:
        return vendor.install(self.config, self.client)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    registry = FakeRegistry()
    tarballs = {name: make_tarball(package_files(name)) for name in VENDOR_FILES}
    registry.tarballs = {url_of(name): data for name, data in tarballs.items()}
    (tmp_path / "assets").mkdir()
    config = VendorConfig(
        lockfile=tmp_path / "assets" / "package-lock.json",
        dest=tmp_path / "static" / "vendor",
        cache=tmp_path / "cache" / "npm",
        registry=REGISTRY,
    )
    with httpx.Client(transport=httpx.MockTransport(registry.handler)) as client:
        w = World(registry, config, client, tmp_path)
        w.write_lockfile(tarballs)
        yield w


def leftovers(world: World) -> list[str]:
    """Anything in static/ besides a finished vendor/ folder (staging or old copies)."""
    static = world.config.dest.parent
    return sorted(p.name for p in static.iterdir() if p.name != "vendor") if static.exists() else []


def test_a_good_fetch_installs_exactly_the_mapped_files_and_a_manifest(world: World) -> None:
    lines: list[str] = []
    assert vendor.install(world.config, world.client, lines.append)

    installed = sorted(p.name for p in world.config.dest.iterdir())
    assert installed == sorted([*ALL_NAMES, "manifest.json"])
    assert world.config.dest.stat().st_mode & 0o777 == 0o755
    assert (world.config.dest / "uPlot.min.css").read_bytes() == b"/* uplot dist/uPlot.min.css */"
    manifest = json.loads((world.config.dest / "manifest.json").read_text())["files"]
    data = (world.config.dest / "pico.min.css").read_bytes()
    assert manifest["pico.min.css"] == {
        "package": "@picocss/pico",
        "version": "2.1.1",
        "path": "css/pico.min.css",
        "size": len(data),
        "sha384": "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode(),
    }
    assert sorted(world.registry.requests) == sorted(url_of(n) for n in VENDOR_FILES)
    assert f"{REGISTRY}/@picocss/pico/-/pico-2.1.1.tgz" in world.registry.requests
    assert len([line for line in lines if line.startswith("vendor: ")]) == len(VENDOR_FILES) + 1
    assert leftovers(world) == []
    assert vendor.check(world.config) == []


def test_a_tarball_that_does_not_match_its_integrity_is_refused_and_nothing_installed(
    world: World,
) -> None:
    evil = make_tarball({"dist/uPlot.iife.min.js": b"evil()", "dist/uPlot.min.css": b""})
    world.registry.served[url_of("uplot")] = evil

    with pytest.raises(IntegrityMismatch, match=r"uplot 1\.6\.32.*nothing was installed") as caught:
        world.install()

    assert isinstance(caught.value, Rejected)
    assert not world.config.dest.exists()
    assert leftovers(world) == []
    assert not any(p.read_bytes() == evil for p in world.tmp.rglob("*.tgz"))  # never cached


def test_a_failed_update_leaves_the_previous_install_untouched(world: World) -> None:
    world.install()
    before = {p.name: p.read_bytes() for p in world.config.dest.iterdir()}
    newer = {name: make_tarball(package_files(name) | {"x": b"1"}) for name in VENDOR_FILES}
    world.write_lockfile(newer)  # the registry still serves the old bytes

    with pytest.raises(IntegrityMismatch):
        world.install()

    assert {p.name: p.read_bytes() for p in world.config.dest.iterdir()} == before
    assert leftovers(world) == []


def test_a_lockfile_without_a_mapped_package_is_a_clear_error_before_any_download(
    world: World,
) -> None:
    tarballs = {name: make_tarball(package_files(name)) for name in VENDOR_FILES}
    world.write_lockfile(tarballs, omit="htmx-ext-sse")

    with pytest.raises(LockfileInvalid, match=r"htmx-ext-sse is not in package-lock\.json.*npm"):
        world.install()

    assert world.registry.requests == []
    assert not world.config.dest.exists()


def test_a_lockfile_pinned_without_sha512_is_refused() -> None:
    weak = LockedPackage("uplot", "1.6.32", "sha1-2jmIqjRRhSBGg58w/5eqMGv3c9Y=", None)
    with pytest.raises(LockfileInvalid, match="no sha512 integrity"):
        vendor.locked_package({"uplot": weak}, "uplot")
    with pytest.raises(LockfileInvalid, match="not an npm lockfile"):
        vendor.parse_lockfile(b'{"lockfileVersion": 1, "dependencies": {}}')


def test_a_path_traversal_member_is_never_extracted(world: World) -> None:
    def traversal(archive: tarfile.TarFile) -> None:
        for name in ("package/../../escaped.js", "../escaped.js", "/tmp-escaped.js"):
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"evil"))

    tarball = make_tarball(package_files("htmx.org"), extra=traversal)
    tarballs = {name: make_tarball(package_files(name)) for name in VENDOR_FILES}
    tarballs["htmx.org"] = tarball
    world.registry.tarballs[url_of("htmx.org")] = tarball
    world.write_lockfile(tarballs)

    world.install()

    assert sorted(p.name for p in world.tmp.rglob("*escaped*")) == []
    assert not any(p.read_bytes() == b"evil" for p in world.tmp.rglob("*") if p.is_file())
    assert sorted(p.name for p in world.config.dest.iterdir()) == sorted(
        [*ALL_NAMES, "manifest.json"]
    )


def test_a_link_in_place_of_a_mapped_file_is_refused() -> None:
    def link(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("package/dist/htmx.min.js")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../../../etc/passwd"
        archive.addfile(info)

    tarball = make_tarball({}, extra=link)
    with pytest.raises(TarballInvalid, match=r"htmx\.org: unsafe member"):
        vendor.extract_files(tarball, VENDOR_FILES["htmx.org"], "htmx.org")
    with pytest.raises(TarballInvalid, match=r"has no dist/htmx\.min\.js"):
        vendor.extract_files(make_tarball({}), VENDOR_FILES["htmx.org"], "htmx.org")
    with pytest.raises(TarballInvalid, match="not a readable gzip tarball"):
        vendor.extract_files(b"<html>", VENDOR_FILES["htmx.org"], "htmx.org")


def test_a_second_run_with_the_stamp_downloads_nothing(world: World) -> None:
    assert world.install()
    world.registry.requests.clear()

    assert not world.install()

    assert world.registry.requests == []


def test_a_removed_install_is_restored_from_the_cache_and_a_corrupt_entry_refetched(
    world: World,
) -> None:
    world.install()
    world.registry.requests.clear()
    (world.config.dest / "htmx.min.js").unlink()  # the stamp alone is not enough
    cached = sorted((world.config.cache or world.tmp).iterdir())
    assert len(cached) == len(VENDOR_FILES)
    cached[0].write_bytes(b"corrupt")

    assert world.install()

    assert len(world.registry.requests) == 1  # only the corrupt one, re-verified on use
    assert vendor.check(world.config) == []


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (refuse, RegistryUnavailable),
        (lambda r: httpx.Response(503), RegistryUnavailable),
        (lambda r: httpx.Response(404), NotOnRegistry),
    ],
    ids=["connect-error", "503", "404"],
)
def test_registry_failures_name_the_package_and_leave_nothing(
    world: World, answer: Callable[[httpx.Request], httpx.Response], error: type[Exception]
) -> None:
    world.registry.fail = answer

    with pytest.raises(error, match=r"htmx\.org 2\.0\.11: .*EDGEFLEET_NPM_REGISTRY") as caught:
        world.install()

    assert isinstance(caught.value, Transient if error is RegistryUnavailable else Rejected)
    assert not world.config.dest.exists()
    assert leftovers(world) == []


def test_check_detects_a_modified_file_and_a_changed_lockfile(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--check", "--lockfile", str(world.config.lockfile), "--dest", str(world.config.dest)]
    assert vendor.main(args) == 1  # not installed
    world.install()
    assert vendor.main(args) == 0

    (world.config.dest / "sse.min.js").write_bytes(b"tampered")
    assert vendor.main(args) == 1
    assert "sse.min.js: does not match manifest.json" in capsys.readouterr().err

    (world.config.dest / "sse.min.js").unlink()
    assert vendor.check(world.config) == ["sse.min.js: missing"]
    world.config.lockfile.write_bytes(world.config.lockfile.read_bytes() + b"\n")
    assert "installed from another package-lock.json" in vendor.check(world.config)[0]


def test_the_tarball_url_is_the_lockfiles_unless_a_registry_is_set() -> None:
    resolved = "https://registry.npmjs.org/uplot/-/uplot-1.6.32.tgz"
    package = LockedPackage("uplot", "1.6.32", "sha512-x", resolved)
    assert vendor.tarball_url(package, None) == resolved
    assert vendor.tarball_url(package, "https://mirror.test/npm/") == (
        "https://mirror.test/npm/uplot/-/uplot-1.6.32.tgz"
    )
    scoped = LockedPackage("@picocss/pico", "2.1.1", "sha512-x", None)
    assert vendor.tarball_url(scoped, None) == (
        "https://registry.npmjs.org/@picocss/pico/-/pico-2.1.1.tgz"
    )


@pytest.mark.integration
def test_the_committed_lockfile_pins_every_mapped_package_by_sha512() -> None:
    packages = vendor.parse_lockfile(VendorConfig().lockfile.read_bytes())
    for name in VENDOR_FILES:
        package = vendor.locked_package(packages, name)
        assert package.integrity.startswith("sha512-"), name
    assert packages["htmx.org"].version.startswith("2.")
    assert packages["@picocss/pico"].version.startswith("2.")
