"""'edgefleet images': keygen, sign, verify and show, on small images made in tmp_path."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner, Result

from fleet.cli import app
from fleet.images.keys import keyid_of
from fleet.images.manifest import MANIFEST_FILE, SIGNATURE_FILE
from tests.fleet.image_support import (
    RECIPE,
    Keys,
    Member,
    default_members,
    make_image,
    make_tar,
    tree_to_tar,
)

EDGEFLEET = typer.main.get_command(app)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(EDGEFLEET, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    result = run("images", "keygen", "--out", tmp_path / "keys")
    assert result.exit_code == 0, result.output
    return tmp_path / "keys"


@pytest.fixture
def keys(keydir: Path) -> Keys:
    return Keys((keydir / "image-key.pem").read_bytes(), (keydir / "image-key.pub").read_bytes())


@pytest.fixture
def image(tmp_path: Path, keys: Keys) -> Path:
    make_image(tmp_path / "out", keys)
    return tmp_path / "out"


def verify(image: Path, keydir: Path, *extra: str | Path) -> Result:
    return run("images", "verify", image, "--key", keydir / "image-key.pub", *extra)


def _failed(result: Result) -> str:
    assert result.exit_code == 2, result.output
    return result.output


def test_images_is_a_command_group() -> None:
    result = run("images", "--help")
    assert result.exit_code == 0
    for command in ("keygen", "sign", "verify", "show"):
        assert command in result.output


def test_keygen_writes_a_private_and_a_public_key(keydir: Path, keys: Keys) -> None:
    private, public = keydir / "image-key.pem", keydir / "image-key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in keys.private
    assert b"PUBLIC KEY" in keys.public


def test_keygen_refuses_to_overwrite(keydir: Path) -> None:
    before = (keydir / "image-key.pem").read_bytes(), (keydir / "image-key.pub").read_bytes()
    result = run("images", "keygen", "--out", keydir)
    assert result.exit_code == 1
    assert "refusing to overwrite" in result.output
    assert before == (
        (keydir / "image-key.pem").read_bytes(),
        (keydir / "image-key.pub").read_bytes(),
    )
    (keydir / "image-key.pem").unlink()  # half a pair left: still refused, nothing written
    assert run("images", "keygen", "--out", keydir).exit_code == 1
    assert not (keydir / "image-key.pem").exists()


def test_keygen_prints_the_keyid(tmp_path: Path) -> None:
    result = run("images", "keygen", "--out", tmp_path / "k")
    keyid = keyid_of((tmp_path / "k" / "image-key.pub").read_bytes())
    assert f"image key {keyid}" in result.output


def test_verify_a_good_image(image: Path, keydir: Path, keys: Keys) -> None:
    files = len(default_members()) - 1  # every member but the root
    for target in (image, image / MANIFEST_FILE):
        result = verify(target, keydir)
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith(
            f"verified: {files} files, 3 artifacts, signed by {keyid_of(keys.public)}"
        )


def _replace_tar(image: Path, members: list[Member]) -> None:
    make_tar(image / f"{RECIPE}.rootfs.tar.gz", members)


def test_one_changed_byte_in_one_file_is_named(image: Path, keydir: Path) -> None:
    members = [
        Member(m.name, m.kind, b"edgf\n", m.target, m.mode, m.uid, m.gid)
        if m.name == "./etc/hostname"
        else m
        for m in default_members()
    ]
    _replace_tar(image, members)
    out = _failed(verify(image, keydir))
    assert "FAILED: 1 of 15 files and 1 of 3 artifacts differ from the manifest" in out
    assert f"changed    {RECIPE}.rootfs.tar.gz: size 461 -> 462; sha256 " in out
    assert "changed    etc/hostname: sha256 " in out
    assert "verified" not in out


def test_a_file_added_removed_or_with_another_mode_is_named(image: Path, keydir: Path) -> None:
    members = [m for m in default_members() if m.name != "./etc/passwd"]
    members = [
        Member(m.name, m.kind, m.data, m.target, 0o777, m.uid, m.gid)
        if m.name == "./usr/bin/agent"
        else m
        for m in members
    ]
    members.append(Member("./usr/bin/backdoor", data=b"#!/bin/sh\n", mode=0o4755))
    _replace_tar(image, members)
    out = _failed(verify(image, keydir))
    assert "missing    etc/passwd" in out
    assert "unexpected usr/bin/backdoor: a file the manifest does not list" in out
    assert "changed    usr/bin/agent: mode 0755 -> 0777" in out


def test_a_manifest_edited_after_signing_stops_there(image: Path, keydir: Path) -> None:
    manifest = image / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"arch":"amd64"', b'"arch":"arm64"'))
    out = _failed(verify(image, keydir))
    assert "changed after it was signed" in out
    assert "artifacts" not in out


def test_a_manifest_signed_by_another_key(tmp_path: Path, image: Path, keydir: Path) -> None:
    other = Keys.new()
    make_image(image, other)
    out = _failed(verify(image, keydir))
    assert f"signed by key {keyid_of(other.public)[:16]}" in out


@pytest.mark.parametrize("garbage", [b"garbage", b"", b'{"alg": "ed25519"}'])
def test_a_garbage_signature_file(image: Path, keydir: Path, garbage: bytes) -> None:
    (image / SIGNATURE_FILE).write_bytes(garbage)
    assert "signature" in _failed(verify(image, keydir))


def test_a_missing_manifest_or_signature(image: Path, keydir: Path) -> None:
    (image / SIGNATURE_FILE).unlink()
    assert "the manifest is unsigned" in _failed(verify(image, keydir))
    (image / MANIFEST_FILE).unlink()
    assert "no manifest.json" in _failed(verify(image, keydir))


def test_a_missing_artifact(image: Path, keydir: Path) -> None:
    (image / f"{RECIPE}.img").unlink()
    out = _failed(verify(image, keydir))
    assert f"missing    {RECIPE}.img" in out


def test_ignore_needs_a_root(image: Path, keydir: Path) -> None:
    result = verify(image, keydir, "--ignore", "etc/hostname")
    assert result.exit_code == 2
    assert "needs --root" in result.output


def test_a_bad_key_file_is_a_usage_error(image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    result = run("images", "verify", image, "--key", bad)
    assert result.exit_code == 2
    assert "not a PEM public key" in result.output


def test_many_mismatches_show_the_first_twenty_and_a_count(
    tmp_path: Path, keys: Keys, keydir: Path
) -> None:
    members = [Member("./data", "dir", mode=0o755)]
    members += [Member(f"./data/{i:02}", data=b"a") for i in range(30)]
    make_image(tmp_path / "big", keys, members)
    _replace_tar(
        tmp_path / "big", [*members[:1], *(Member(m.name, data=b"b") for m in members[1:])]
    )
    out = _failed(verify(tmp_path / "big", keydir))
    assert "FAILED: 30 of 31 files and 1 of 3 artifacts differ" in out
    assert out.count("changed    data/") == 19  # 20 shown, the tarball first
    assert "... and 11 more" in out


def _provisioned_root(tmp_path: Path, keys: Keys) -> tuple[Path, Path]:
    """An unpacked root (owned by whoever runs the tests) and its image."""
    root = tmp_path / "root"
    for folder in ("etc/edgefleet", "var/lib", "usr/bin"):
        (root / folder).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("edge\n")
    (root / "usr" / "bin" / "agent").write_text("#!/bin/sh\n")
    (root / "usr" / "bin" / "agent").chmod(0o755)
    make_image(tmp_path / "out", keys, tarball=tree_to_tar(root, tmp_path / "root.tar.gz"))
    # what provisioning and the first boot add
    (root / "etc" / "edgefleet" / "provision.env").write_text("EDGEFLEET_TOKEN=eft_x\n")
    (root / "etc" / "edgefleet" / "root.json").write_text("{}")
    (root / "var" / "lib" / "edgefleet" / "identity").mkdir(parents=True)
    (root / "var" / "lib" / "edgefleet" / "identity" / "key.pem").write_text("k")
    return root, tmp_path / "out"


def test_verify_a_root_ignores_what_provisioning_writes(
    tmp_path: Path, keys: Keys, keydir: Path
) -> None:
    root, image = _provisioned_root(tmp_path, keys)
    result = verify(image, keydir, "--root", root)
    assert result.exit_code == 0, result.output
    assert "not compared (written after the build): var/lib/edgefleet," in result.output
    assert "etc/edgefleet/provision.env" in result.output
    assert "verified: " in result.output
    (root / "etc" / "hostname").write_text("evil\n")
    (root / "etc" / "edgefleet" / "extra.conf").write_text("x")
    out = _failed(verify(image, keydir, "--root", root))
    assert "changed    etc/hostname: " in out
    assert "unexpected etc/edgefleet/extra.conf" in out
    result = verify(
        image,
        keydir,
        "--root",
        root,
        "--ignore",
        "etc/hostname",
        "--ignore",
        "/etc/edgefleet/extra.conf",
    )
    assert result.exit_code == 0, result.output


def test_sign_checks_then_signs_an_unsigned_image(tmp_path: Path, keys: Keys, keydir: Path) -> None:
    make_image(tmp_path / "out", None)
    image = tmp_path / "out"
    assert not (image / SIGNATURE_FILE).exists()
    (image / f"{RECIPE}.img").write_bytes(b"tampered")
    result = run("images", "sign", image, "--key", keydir / "image-key.pem")
    assert "not signed: 0 of 15 files and 1 of 3 artifacts differ" in _failed(result)
    assert not (image / SIGNATURE_FILE).exists()
    make_image(image, None)
    result = run("images", "sign", image / MANIFEST_FILE, "--key", keydir / "image-key.pem")
    assert result.exit_code == 0, result.output
    assert f"signed {RECIPE} 2025.6.1: {keyid_of(keys.public)}" in result.output
    assert stat.S_IMODE((image / SIGNATURE_FILE).stat().st_mode) == 0o644
    assert verify(image, keydir).exit_code == 0


def test_sign_refuses_a_malformed_manifest(image: Path, keydir: Path) -> None:
    (image / MANIFEST_FILE).write_text('{"format": "something else"}')
    (image / SIGNATURE_FILE).unlink()
    result = run("images", "sign", image, "--key", keydir / "image-key.pem", "--no-check")
    assert "malformed" in _failed(result)
    assert not (image / SIGNATURE_FILE).exists()


def test_show_an_image(image: Path, keydir: Path, keys: Keys) -> None:
    result = run("images", "show", image)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"recipe:       {RECIPE}" in out
    assert "version:      2025.6.1" in out
    assert "arch:         amd64" in out
    assert "packages:     2 Debian, 1 Python" in out
    assert "built:        2023-11-14 22:13:20 UTC" in out
    assert f"artifact:     {RECIPE}.img  4.5 KiB  sha256 " in out
    assert f"signed by:    {keyid_of(keys.public)} (not verified: pass --key)" in out
    verified = run("images", "show", image, "--key", keydir / "image-key.pub", "--json")
    assert verified.exit_code == 0, verified.output
    summary = json.loads(verified.output)
    assert summary["keyid"] == keyid_of(keys.public)
    assert summary["verified"] is True
    assert summary["packages"] == {"debian": 2, "python": 1}
    assert summary["artifacts"][f"{RECIPE}.img"]["size"] == 4622


def test_show_with_a_key_refuses_a_tampered_manifest(image: Path, keydir: Path) -> None:
    manifest = image / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b"2025.6.1", b"2025.6.9"))
    assert run("images", "show", image).exit_code == 0  # unverified, and says so
    result = run("images", "show", image, "--key", keydir / "image-key.pub")
    assert "changed after it was signed" in _failed(result)


def test_recipes_lists_every_device_class() -> None:
    result = run("images", "recipes")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["jetson-orin", "x86_64-cpu", "x86_64-nvidia"]


def test_building_an_unknown_recipe_names_the_known_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(EDGEFLEET, ["images", "build", "raspberry-pi", "--out",
                                            str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2
    assert "unknown recipe 'raspberry-pi'; known recipes: jetson-orin, x86_64-cpu" in result.output
    assert not (tmp_path / "out").exists()  # nothing made
