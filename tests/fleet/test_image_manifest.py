"""Image manifests: the key, signing and verifying, reading tarballs and trees, comparing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.errors import ConfigError, ImageRejected
from fleet.images.folder import check_image, verify_image
from fleet.images.inventory import (
    DebianPackage,
    debian_packages_from_status,
    distro_from_os_release,
    python_packages_from_site,
)
from fleet.images.keys import SIGNING_CONTEXT, keyid_of, sign_manifest, signature_keyid
from fleet.images.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SIGNATURE_FILE,
    FileEntry,
    ImageManifest,
    Mismatch,
    check_entries,
    manifest_bytes,
    parse_manifest,
    verify_manifest,
)
from fleet.images.scan import artifact_of, check_artifacts, entries_from_tar, entries_from_tree
from tests.fleet.image_support import RECIPE, Keys, Member, default_members, make_image, make_tar


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.new()


@pytest.fixture
def image(tmp_path: Path, keys: Keys) -> tuple[Path, ImageManifest]:
    folder = tmp_path / "out"
    return folder, make_image(folder, keys)


def _signed(folder: Path) -> tuple[bytes, bytes]:
    return (folder / MANIFEST_FILE).read_bytes(), (folder / SIGNATURE_FILE).read_bytes()


def _with(members: list[Member], name: str, **changes: object) -> list[Member]:
    """``members`` with the one named ``name`` changed (it must exist)."""
    assert any(m.name == name for m in members)
    return [
        Member(**{**m.__dict__, **changes}) if m.name == name else m  # type: ignore[arg-type]
        for m in members
    ]


# -- keys and signatures ---------------------------------------------------------------------


def test_keyid_is_the_sha256_of_the_raw_public_key(keys: Keys) -> None:
    private = serialization.load_pem_private_key(keys.private, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert keyid_of(keys.public) == hashlib.sha256(raw).hexdigest()
    assert b"PRIVATE KEY" in keys.private
    assert b"PUBLIC KEY" in keys.public
    assert keyid_of(Keys.new().public) != keyid_of(keys.public)


def test_a_signature_verifies_and_names_its_key(
    image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    folder, manifest = image
    raw, signature = _signed(folder)
    assert verify_manifest(raw, signature, keys.public) == manifest
    document = json.loads(signature)
    assert set(document) == {"alg", "keyid", "sig"}
    assert document["alg"] == "ed25519"
    assert signature_keyid(signature) == keyid_of(keys.public)


def test_a_manifest_edited_after_signing_is_rejected(
    image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    folder, _ = image
    raw, signature = _signed(folder)
    edited = raw.replace(b'"version":"2025.6.1"', b'"version":"2025.6.2"')
    assert edited != raw
    with pytest.raises(ImageRejected, match="changed after it was signed"):
        verify_manifest(edited, signature, keys.public)
    with pytest.raises(ImageRejected, match="changed after it was signed"):
        verify_manifest(raw + b" ", signature, keys.public)


def test_a_manifest_signed_by_another_key_names_both_keys(
    image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    folder, _ = image
    raw, _ = _signed(folder)
    other = Keys.new()
    signature = sign_manifest(raw, other.private)
    with pytest.raises(ImageRejected) as caught:
        verify_manifest(raw, signature, keys.public)
    message = str(caught.value)
    assert f"signed by key {keyid_of(other.public)[:16]}" in message
    assert f"the fleet's image key is {keyid_of(keys.public)[:16]}" in message


def test_a_signature_claiming_our_keyid_but_made_by_another_key_is_rejected(
    image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    folder, _ = image
    raw, _ = _signed(folder)
    forged = json.loads(sign_manifest(raw, Keys.new().private))
    forged["keyid"] = keyid_of(keys.public)
    with pytest.raises(ImageRejected, match="does not match"):
        verify_manifest(raw, json.dumps(forged).encode(), keys.public)


def test_the_signature_covers_the_context_prefix(
    image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    """A signature of the bare bytes (made for some other purpose) is not a manifest's."""
    folder, _ = image
    raw, _ = _signed(folder)
    private = serialization.load_pem_private_key(keys.private, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    bare = {
        "alg": "ed25519",
        "keyid": keyid_of(keys.public),
        "sig": base64.b64encode(private.sign(raw)).decode(),
    }
    with pytest.raises(ImageRejected, match="does not match"):
        verify_manifest(raw, json.dumps(bare).encode(), keys.public)
    prefixed = {**bare, "sig": base64.b64encode(private.sign(SIGNING_CONTEXT + raw)).decode()}
    assert verify_manifest(raw, json.dumps(prefixed).encode(), keys.public).recipe == RECIPE


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (b"garbage", "not JSON"),
        (b"", "not JSON"),
        (b"[]", "not {alg, keyid, sig}"),
        (b'{"alg": "ed25519", "keyid": "ab"}', "not {alg, keyid, sig}"),
        (b'{"alg": "rsa", "keyid": "ab", "sig": "AAAA"}', "algorithm is 'rsa'"),
        (b'{"alg": "ed25519", "keyid": 1, "sig": "AAAA"}', "must be strings"),
        (b'{"alg": "ed25519", "keyid": "ab", "sig": "not base64!"}', "not base64"),
        (b'{"alg": "ed25519", "keyid": "ab", "sig": "AAAA"}', "3 bytes"),
        (b"{" + b" " * 5000 + b"}", "not a signature"),
    ],
)
def test_a_garbage_signature_file_is_rejected(
    image: tuple[Path, ImageManifest], keys: Keys, signature: bytes, reason: str
) -> None:
    folder, _ = image
    raw, _ = _signed(folder)
    with pytest.raises(ImageRejected, match=reason.replace("{", r"\{").replace("}", r"\}")):
        verify_manifest(raw, signature, keys.public)


def test_a_signed_but_malformed_manifest_is_rejected(keys: Keys) -> None:
    for raw in (b"not json", b'{"format": "edgefleet-image-manifest/1"}', b"[]"):
        with pytest.raises(ImageRejected, match="malformed"):
            verify_manifest(raw, sign_manifest(raw, keys.private), keys.public)


def test_a_bad_public_key_is_a_config_error(image: tuple[Path, ImageManifest]) -> None:
    folder, _ = image
    raw, signature = _signed(folder)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_manifest(raw, signature, b"not a key")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="not Ed25519"):
        verify_manifest(raw, signature, pem)


# -- the manifest's bytes and shape ----------------------------------------------------------


def test_two_builds_of_the_same_image_give_identical_manifest_bytes(
    tmp_path: Path, keys: Keys
) -> None:
    first = make_image(tmp_path / "a", keys)
    second = make_image(tmp_path / "b", keys)
    assert manifest_bytes(first) == manifest_bytes(second)
    assert (tmp_path / "a" / MANIFEST_FILE).read_bytes() == (
        tmp_path / "b" / MANIFEST_FILE
    ).read_bytes()
    assert parse_manifest(manifest_bytes(first)) == first
    third = make_image(tmp_path / "c", keys, version="2025.6.2")
    assert manifest_bytes(third) != manifest_bytes(first)


def test_manifest_bytes_are_sorted_json_with_one_file_a_line(
    image: tuple[Path, ImageManifest],
) -> None:
    _, manifest = image
    raw = manifest_bytes(manifest)
    data = json.loads(raw)
    assert list(data) == sorted(data)
    assert data["format"] == "edgefleet-image-manifest/1"
    lines = raw.decode().splitlines()
    file_lines = [line for line in lines if line.startswith('{"')]
    assert len(file_lines) == len(manifest.files)
    assert [json.loads(line.rstrip(","))["path"] for line in file_lines] == [
        f.path for f in manifest.files
    ]
    assert raw.isascii()


def test_the_manifest_lists_every_member_but_the_root(image: tuple[Path, ImageManifest]) -> None:
    _, manifest = image
    by_path = {f.path: f for f in manifest.files}
    assert list(by_path) == sorted(by_path)
    assert "" not in by_path
    assert "." not in by_path
    assert len(by_path) == len(default_members()) - 1
    agent = by_path["usr/bin/agent"]
    assert agent.type == "file"
    assert agent.mode == 0o755
    assert agent.size == len(b"#!/bin/sh\necho agent\n")
    assert agent.sha256 == hashlib.sha256(b"#!/bin/sh\necho agent\n").hexdigest()
    assert by_path["usr/bin/su"].mode == 0o4755
    assert by_path["etc/shadow"].gid == 42
    assert by_path["bin"].type == "symlink"
    assert by_path["bin"].target == "usr/bin"
    assert by_path["usr/bin/agent-again"].type == "hardlink"
    assert by_path["usr/bin/agent-again"].target == "usr/bin/agent"
    assert by_path["dev/null"].device == "1:3"
    assert by_path["run/initctl"].type == "fifo"
    assert by_path["etc"].type == "dir"
    assert by_path["etc"].size == 0
    assert by_path["etc"].sha256 is None


@pytest.mark.parametrize("path", ["/etc/passwd", "../etc", "etc/../x", "./etc", "a//b", "", "a/"])
def test_a_file_entry_path_must_be_relative_and_normalised(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        FileEntry(path=path, type="dir", mode=0o755, uid=0, gid=0)


def test_a_file_entry_carries_the_fields_of_its_type() -> None:
    digest = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        FileEntry(path="a", type="file", mode=0o644, uid=0, gid=0)
    with pytest.raises(ValueError, match="sha256"):
        FileEntry(path="a", type="dir", mode=0o755, uid=0, gid=0, sha256=digest)
    with pytest.raises(ValueError, match="target"):
        FileEntry(path="a", type="symlink", mode=0o777, uid=0, gid=0)
    with pytest.raises(ValueError, match="path"):
        FileEntry(path="a", type="hardlink", mode=0o644, uid=0, gid=0, target="../etc/shadow")
    with pytest.raises(ValueError, match="device"):
        FileEntry(path="a", type="chardev", mode=0o644, uid=0, gid=0)
    with pytest.raises(ValueError, match="mode"):
        FileEntry(path="a", type="dir", mode=0o10000, uid=0, gid=0)


def test_a_manifest_refuses_unsorted_or_repeated_files_and_odd_artifacts(
    image: tuple[Path, ImageManifest],
) -> None:
    _, manifest = image
    data = manifest.model_dump()
    with pytest.raises(ValueError, match="sorted"):
        ImageManifest.model_validate({**data, "files": list(reversed(data["files"]))})
    with pytest.raises(ValueError, match="sorted"):
        ImageManifest.model_validate({**data, "files": [data["files"][0], data["files"][0]]})
    artifact = next(iter(data["artifacts"].values()))
    for name in ("../etc/passwd", "sub/file", MANIFEST_FILE, ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            ImageManifest.model_validate(
                {**data, "artifacts": {**data["artifacts"], name: artifact}}
            )
    with pytest.raises(ValueError, match="files_from"):
        ImageManifest.model_validate({**data, "files_from": "other.tar.gz"})
    with pytest.raises(ValueError, match="Extra inputs"):
        ImageManifest.model_validate({**data, "comment": "hi"})
    with pytest.raises(ValueError, match="format"):
        ImageManifest.model_validate({**data, "format": "edgefleet-image-manifest/2"})


# -- reading tarballs and trees --------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([Member("/etc/passwd")], "unsafe or malformed"),
        ([Member("./../escape")], "unsafe or malformed"),
        ([Member("./a"), Member("a")], "lists 'a' twice"),
        ([Member("./a", "hardlink", target="/etc/shadow")], "unsafe or malformed"),
    ],
)
def test_a_hostile_tarball_is_rejected(tmp_path: Path, members: list[Member], reason: str) -> None:
    tarball = make_tar(tmp_path / "t.tar.gz", members)
    with pytest.raises(ImageRejected, match=reason):
        entries_from_tar(tarball)


def test_a_file_that_is_no_tarball_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageRejected, match="not a readable tarball"):
        entries_from_tar(path)
    with pytest.raises(ImageRejected, match="no tarball"):
        entries_from_tar(tmp_path / "absent.tar.gz")


def test_reading_a_tarball_reports_progress(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "t.tar.gz", default_members())
    seen: list[int] = []
    entries_from_tar(tarball, seen.append)
    assert sum(seen) == tarball.stat().st_size


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_bytes(b"edge\n")
    (root / "etc" / "secret").write_bytes(b"s")
    (root / "etc" / "secret").chmod(0o600)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "agent").write_bytes(b"#!/bin/sh\n")
    (root / "usr" / "bin" / "agent").chmod(0o755)
    os.link(root / "usr" / "bin" / "agent", root / "usr" / "bin" / "agent-again")
    (root / "bin").symlink_to("usr/bin")
    (root / "outside").symlink_to("/etc")
    (root / "var" / "lib").mkdir(parents=True)
    return root


def test_a_tree_reads_like_its_tarball(tmp_path: Path) -> None:
    from tests.fleet.image_support import tree_to_tar

    root = _tree(tmp_path / "root")
    from_tree = entries_from_tree(root)
    from_tar = entries_from_tar(tree_to_tar(root, tmp_path / "t.tar.gz"))
    paths = [e.path for e in from_tree]
    assert paths == sorted(paths)
    assert {e.path for e in from_tar} == set(paths)
    by_path = {e.path: e for e in from_tree}
    assert by_path["outside"].type == "symlink"
    assert by_path["outside"].target == "/etc"
    assert "outside/passwd" not in by_path  # never followed
    assert by_path["etc/secret"].mode == 0o600
    assert by_path["etc/secret"].uid == os.getuid()
    # the tarball has a hard link where the tree has a second file: still no difference
    assert {e.path: e.type for e in from_tar}["usr/bin/agent-again"] == "hardlink"
    assert by_path["usr/bin/agent-again"].type == "file"
    manifest = ImageManifest(
        recipe=RECIPE,
        version="1",
        arch="amd64",
        device_class="x86",
        source_date_epoch=0,
        built_with="0.1.0",
        artifacts={"t.tar.gz": artifact_of(tmp_path / "t.tar.gz")},
        files_from="t.tar.gz",
        files=from_tar,
    )
    assert check_entries(manifest, from_tree) == []
    (root / "usr" / "bin" / "agent").write_bytes(b"#!/bin/sh\nevil\n")  # both names change
    changed = {m.path for m in check_entries(manifest, entries_from_tree(root))}
    assert changed == {"usr/bin/agent", "usr/bin/agent-again"}


# -- comparing -------------------------------------------------------------------------------


def _compare(tmp_path: Path, manifest: ImageManifest, members: list[Member]) -> list[Mismatch]:
    return check_entries(manifest, entries_from_tar(make_tar(tmp_path / "found.tar.gz", members)))


def test_an_identical_tarball_has_no_mismatches(
    tmp_path: Path, image: tuple[Path, ImageManifest]
) -> None:
    _, manifest = image
    assert _compare(tmp_path, manifest, default_members()) == []


def test_one_changed_byte_is_named(tmp_path: Path, image: tuple[Path, ImageManifest]) -> None:
    _, manifest = image
    members = _with(default_members(), "./etc/passwd", data=b"root:x:0:0:root:/root:/bin/sH\n")
    (mismatch,) = _compare(tmp_path, manifest, members)
    assert mismatch.path == "etc/passwd"
    assert mismatch.kind == "changed"
    assert "sha256" in mismatch.detail
    assert "size" not in mismatch.detail
    assert str(mismatch).startswith("changed    etc/passwd: sha256 ")


def test_added_removed_and_retyped_files_are_named(
    tmp_path: Path, image: tuple[Path, ImageManifest]
) -> None:
    _, manifest = image
    members = [m for m in default_members() if m.name != "./etc/hostname"]
    members.append(Member("./etc/backdoor", data=b"x"))
    members = _with(members, "./bin", kind="dir", target="", mode=0o755)
    found = {m.path: m for m in _compare(tmp_path, manifest, members)}
    assert set(found) == {"etc/hostname", "etc/backdoor", "bin"}
    assert found["etc/hostname"].kind == "missing"
    assert found["etc/backdoor"].kind == "unexpected"
    assert found["bin"].detail == "type symlink -> dir"


def test_mode_owner_target_and_device_changes_are_named(
    tmp_path: Path, image: tuple[Path, ImageManifest]
) -> None:
    _, manifest = image
    members = _with(default_members(), "./etc/shadow", mode=0o644, uid=1000)
    members = _with(members, "./bin", target="/tmp/bin")
    members = _with(members, "./dev/null", target="1:5")
    found = {m.path: m.detail for m in _compare(tmp_path, manifest, members)}
    assert found == {
        "etc/shadow": "mode 0640 -> 0644; uid 0 -> 1000",
        "bin": "target 'usr/bin' -> '/tmp/bin'",
        "dev/null": "device '1:3' -> '1:5'",
    }


def test_ignored_paths_and_listed_only(tmp_path: Path, image: tuple[Path, ImageManifest]) -> None:
    _, manifest = image
    members = [
        *_with(default_members(), "./etc/hostname", data=b"other\n"),
        Member("./var/lib/edgefleet/identity/key.pem", data=b"k"),
        Member("./var/lib/edgefleet-not", data=b"k"),
    ]
    found = entries_from_tar(make_tar(tmp_path / "found.tar.gz", members))
    ignored = check_entries(manifest, found, ignore=("var/lib/edgefleet", "etc/hostname"))
    assert [m.path for m in ignored] == ["var/lib/edgefleet-not"]
    listed = check_entries(manifest, found, listed_only=True)
    assert [m.path for m in listed] == ["etc/hostname"]


def test_artifacts_are_compared_by_size_and_hash(
    image: tuple[Path, ImageManifest],
) -> None:
    folder, manifest = image
    assert check_artifacts(manifest, folder) == []
    raw_image = folder / f"{RECIPE}.img"
    data = bytearray(raw_image.read_bytes())
    data[100] ^= 1
    raw_image.write_bytes(bytes(data))
    (folder / "sbom.cdx.json").unlink()
    found = {m.path: m for m in check_artifacts(manifest, folder)}
    assert set(found) == {f"{RECIPE}.img", "sbom.cdx.json"}
    assert found[f"{RECIPE}.img"].kind == "changed"
    assert found[f"{RECIPE}.img"].detail.startswith("sha256 ")
    assert found["sbom.cdx.json"].kind == "missing"


def test_verify_image_checks_signature_artifacts_and_files(
    tmp_path: Path, image: tuple[Path, ImageManifest], keys: Keys
) -> None:
    folder, manifest = image
    result = verify_image(folder, keys.public)
    assert result.ok
    assert result.keyid == keyid_of(keys.public)
    # the tarball is swapped for one with a changed file: the artifact and the file are named
    members = _with(default_members(), "./etc/hostname", data=b"evil\n")
    make_tar(folder / manifest.files_from, members)
    result = verify_image(folder, keys.public)
    assert not result.ok
    assert [m.path for m in result.artifact_mismatches] == [manifest.files_from]
    assert [m.path for m in result.file_mismatches] == ["etc/hostname"]
    # nothing is read before the signature verifies
    with pytest.raises(ImageRejected, match="signed by key"):
        verify_image(folder, Keys.new().public)
    (folder / SIGNATURE_FILE).unlink()
    with pytest.raises(ImageRejected, match="unsigned"):
        verify_image(folder, keys.public)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(ImageRejected, match=r"no manifest\.json"):
        verify_image(folder, keys.public)


def test_a_tarball_that_is_not_one_is_a_mismatch_not_a_crash(
    image: tuple[Path, ImageManifest],
) -> None:
    folder, manifest = image
    (folder / manifest.files_from).write_bytes(b"junk")
    artifacts, files = check_image(folder, manifest)
    assert [m.path for m in artifacts] == [manifest.files_from]
    assert [m.path for m in files] == [manifest.files_from]
    assert "not a readable tarball" in files[0].detail
    (folder / manifest.files_from).unlink()
    artifacts, files = check_image(folder, manifest)
    assert [m.kind for m in artifacts] == ["missing"]
    assert files == []


def test_verify_image_on_a_root_tree(tmp_path: Path, keys: Keys) -> None:
    from tests.fleet.image_support import tree_to_tar

    root = _tree(tmp_path / "root")
    tarball = tree_to_tar(root, tmp_path / "t.tar.gz")
    folder = tmp_path / "out"
    make_image(folder, keys, tarball=tarball)
    assert verify_image(folder, keys.public, root=root).ok
    (root / "var" / "lib" / "edgefleet").mkdir(parents=True)
    (root / "var" / "lib" / "edgefleet" / "state.json").write_text("{}")
    shutil.rmtree(root / "usr" / "bin")
    result = verify_image(folder, keys.public, root=root, ignore=("var/lib/edgefleet",))
    assert result.artifact_mismatches == ()
    assert [m.path for m in result.file_mismatches] == [
        "usr/bin",
        "usr/bin/agent",
        "usr/bin/agent-again",
    ]


# -- inventory -------------------------------------------------------------------------------

STATUS = """\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u10
Description: GNU C Library
 Contains the standard libraries.
 .
 Version: 9.9 (not a field)

Package: oldpkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: libc6
Status: install ok installed
Architecture: i386
Version: 2.36-9+deb12u10

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b7

Package: broken
Status: install reinstreq half-installed
Architecture: amd64
Version: 0.1
"""


def test_debian_packages_are_the_installed_ones(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(STATUS)
    assert debian_packages_from_status(status) == [
        DebianPackage(name="bash", version="5.2.15-2+b7", arch="amd64"),
        DebianPackage(name="libc6", version="2.36-9+deb12u10", arch="amd64"),
        DebianPackage(name="libc6", version="2.36-9+deb12u10", arch="i386"),
    ]
    status.write_text("Package: evil pkg\nStatus: install ok installed\nVersion: 1\n")
    with pytest.raises(ImageRejected, match="malformed"):
        debian_packages_from_status(status)
    with pytest.raises(ImageRejected, match="cannot read"):
        debian_packages_from_status(tmp_path / "absent")


def _dist(site: Path, folder: str, name: str, version: str) -> None:
    (site / folder).mkdir(parents=True)
    (site / folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nVersion: 0 (the body)\n"
    )


def test_python_packages_come_from_dist_info(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    _dist(site, "pydantic-2.14.3.dist-info", "pydantic", "2.14.3")
    _dist(site, "Jinja2-3.1.6.dist-info", "Jinja2", "3.1.6")
    _dist(site, "typing_extensions-4.12.2.dist-info", "typing_extensions", "4.12.2")
    (site / "pydantic").mkdir()
    found = [(p.name, p.version) for p in python_packages_from_site(site)]
    assert found == [("Jinja2", "3.1.6"), ("pydantic", "2.14.3"), ("typing_extensions", "4.12.2")]


@pytest.mark.parametrize(
    ("name", "version"),
    [("--index-url", "1"), ("ok", "1 ; evil"), ("", "1"), ("ok", "")],
)
def test_a_package_that_could_change_a_requirements_line_is_rejected(
    tmp_path: Path, name: str, version: str
) -> None:
    _dist(tmp_path, "x-1.dist-info", name, version)
    with pytest.raises(ImageRejected, match="METADATA"):
        python_packages_from_site(tmp_path)


def test_distro_from_os_release(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n')
    assert distro_from_os_release(path) == "debian-12"
    path.write_text("ID=ubuntu\nVERSION_ID=22.04\n")
    assert distro_from_os_release(path) == "ubuntu-22.04"
    path.write_text("NAME=unknown\n")
    with pytest.raises(ImageRejected, match="names no distribution"):
        distro_from_os_release(path)


def test_the_docs_example_is_a_manifest_in_its_own_format() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "images.md").read_text()
    (example,) = [
        block
        for block in re.findall(r"```json\n(.*?)```", doc, flags=re.S)
        if MANIFEST_FORMAT in block
    ]
    assert manifest_bytes(parse_manifest(example.encode())) == example.encode()
