"""The jetson-orin overlay: its pure parts directly, and the overlay built for real.

The pure parts (file names to packages, wheel tags against CPython 3.11 on aarch64,
``install.env``, the recipe's checks) are fast unit tests; those that run ``bash`` on
``install.env`` and ``install.sh`` start a process, so they are ``integration``, but
take well under a second. The other ``integration`` tests build the recipe with
:func:`fleet.images.build.build_image` (the wheels come from PyPI), once for the module
and once more to compare the bytes, and check what the overlay holds, where, with which
modes and owners, that ``edgefleet images verify`` passes, and that the overlay checks
out laid over a vendor root, before and after the install step. The install step itself
needs an aarch64 L4T root, so it is not run here: ``install.sh`` is checked by
``bash -n``, by shellcheck where it is installed, and by its refusals.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename
from typer.testing import CliRunner

from fleet.cli import app as fleet_cli
from fleet.errors import ImageRejected
from fleet.images.build import Built, build_image
from fleet.images.folder import verify_image
from fleet.images.keys import generate_image_key
from fleet.images.overlay import (
    INSTALL_ENV,
    INSTALL_SCRIPT,
    WHEELHOUSE,
    check_overlay_recipe,
    install_env,
    misfits,
    parse_dist_file,
    python_packages,
)
from fleet.images.recipe import ImageKind, LlamaBuild, Recipe, load_recipe
from fleet.images.rootfs import agent_config
from fleet.images.wheels import CONSTRAINTS, LLAMA_PACKAGE, pinned_version

# StepRunner.run (fleet/images/steps.py) leaves each command's output pipe for the garbage
# collector to close; until it closes it, that ResourceWarning is not this module's failure.

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "firmware-images"
RECIPE = "jetson-orin"
OVERLAY = f"{RECIPE}.overlay.tar.gz"
EPOCH = 1764547200  # 2025-12-01: SOURCE_DATE_EPOCH for both builds
SCRIPT = RECIPES / RECIPE / "install.sh"
FILES = {  # image path -> (source under firmware-images/, mode)
    "etc/systemd/system/edgefleet-agent.service": ("common/edgefleet-agent.service", 0o644),
    "usr/lib/sysusers.d/edgefleet.conf": ("common/sysusers.conf", 0o644),
    "usr/lib/tmpfiles.d/edgefleet.conf": ("common/tmpfiles.conf", 0o644),
    "opt/edgefleet-wheelhouse/install.sh": (f"{RECIPE}/install.sh", 0o755),
    "opt/edgefleet-wheelhouse/constraints.txt": (CONSTRAINTS, 0o644),
}


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return load_recipe(RECIPES, RECIPE)


# --- the recipe ------------------------------------------------------------------------------


def test_the_recipe_is_an_overlay_for_l4t_with_its_own_python(recipe: Recipe) -> None:
    assert recipe.kind is ImageKind.OVERLAY
    assert recipe.arch == "arm64"
    assert recipe.python == "3.11"
    assert recipe.vendor is not None
    assert recipe.vendor.python == "python3.11"
    assert "R36.4" in recipe.vendor.vendor
    assert recipe.agent.llama is LlamaBuild.SOURCE_CUDA
    assert recipe.agent.extras == ("device",)  # no model packages: the fleet sends models
    assert recipe.agent.bake_models == ()
    assert recipe.enable == ("edgefleet-agent.service",)
    # L4T brings NetworkManager: no systemd-networkd file.
    assert not any(path.startswith("/etc/systemd/network") for path in recipe.files)
    check_overlay_recipe(recipe)


def test_an_overlay_recipe_without_its_install_step_is_refused(recipe: Recipe) -> None:
    files = {p: s for p, s in recipe.files.items() if p != INSTALL_SCRIPT}
    with pytest.raises(ImageRejected, match=re.escape(INSTALL_SCRIPT)):
        check_overlay_recipe(recipe.model_copy(update={"files": files}))
    files = {**recipe.files, INSTALL_ENV: "common/agent.toml"}
    with pytest.raises(ImageRejected, match="written by the build"):
        check_overlay_recipe(recipe.model_copy(update={"files": files}))
    agent = recipe.agent.model_copy(update={"bake_models": ("gemma3-270m",)})
    with pytest.raises(ImageRejected, match="bakes in no models"):
        check_overlay_recipe(recipe.model_copy(update={"agent": agent}))


# --- wheel and sdist file names ---------------------------------------------------------------


def test_a_wheel_name_gives_its_package_and_every_tag() -> None:
    dist = parse_dist_file(
        "MarkupSafe-3.0.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl"
    )
    assert (dist.name, dist.version, dist.is_sdist) == ("markupsafe", "3.0.4", False)
    assert {t.platform for t in dist.tags} == {"manylinux2014_aarch64", "manylinux_2_17_aarch64"}


def test_an_sdist_name_gives_its_package() -> None:
    dist = parse_dist_file("llama_cpp_python-0.3.36.tar.gz")
    assert (dist.name, dist.version, dist.is_sdist) == ("llama-cpp-python", "0.3.36", True)


@pytest.mark.parametrize(
    "name", ["README.md", "numpy-2.4.6.zip", "numpy-cp311-x.whl", "not a wheel.whl"]
)
def test_anything_else_in_a_wheelhouse_is_refused(name: str) -> None:
    with pytest.raises(ImageRejected, match="wheelhouse holds"):
        parse_dist_file(name)


FITTING = [
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
    "cryptography-50.0.2-cp311-abi3-manylinux_2_34_aarch64.whl",
    "hf_xet-1.8.0-cp38-abi3-manylinux_2_28_aarch64.whl",
    "psutil-7.2.2-cp36-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
    "flatbuffers-25.12.19-py2.py3-none-any.whl",
    "pydantic-2.14.3-py3-none-any.whl",
    "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl",  # what the device builds
    "llama_cpp_python-0.3.36.tar.gz",  # shipped as source on purpose
]
MISFITTING = {
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl": "not for CPython 3.11 on arm64",
    "numpy-2.4.6-cp310-cp310-manylinux_2_27_aarch64.whl": "not for CPython 3.11 on arm64",
    "numpy-2.4.6-cp312-abi3-manylinux_2_27_aarch64.whl": "not for CPython 3.11 on arm64",
    "numpy-2.4.6-cp311-cp311-manylinux_2_39_aarch64.whl": "glibc 2.35 at most",
    "numpy-2.4.6-cp311-cp311-macosx_14_0_arm64.whl": "not for CPython 3.11 on arm64",
    "PyYAML-6.0.4.tar.gz": "an sdist; pin a version with a wheel",
}


def test_wheels_for_cpython_311_on_aarch64_or_pure_fit() -> None:
    files = [parse_dist_file(name) for name in FITTING]
    assert misfits(files, "3.11", "arm64", sdists={LLAMA_PACKAGE}) == []


@pytest.mark.parametrize(("name", "why"), sorted(MISFITTING.items()))
def test_a_wheel_for_another_python_or_machine_is_named(name: str, why: str) -> None:
    files = [parse_dist_file(n) for n in [*FITTING, name]]
    problems = misfits(files, "3.11", "arm64", sdists={LLAMA_PACKAGE})
    assert len(problems) == 1
    assert problems[0].startswith(f"{name}: ")
    assert why in problems[0]


def test_the_packages_are_listed_once_each_by_canonical_name() -> None:
    files = [
        parse_dist_file(n)
        for n in [
            "PyYAML-6.0.4-cp311-cp311-manylinux_2_17_aarch64.whl",
            "pyyaml-6.0.4-cp311-cp311-manylinux_2_28_aarch64.whl",
            "llama_cpp_python-0.3.36.tar.gz",
            "aiomqtt-2.5.1-py3-none-any.whl",
        ]
    ]
    assert [(p.name, p.version) for p in python_packages(files)] == [
        ("aiomqtt", "2.5.1"),
        ("llama-cpp-python", "0.3.36"),
        ("pyyaml", "6.0.4"),
    ]


# --- install.env and install.sh ---------------------------------------------------------------


def _sourced(env_text: str, tmp_path: Path) -> dict[str, str]:
    """What a shell that sources ``env_text`` sees, the way install.sh reads it."""
    env_file = tmp_path / "install.env"
    env_file.write_text(env_text)
    names = ["PYTHON", "REQUIREMENT", "LLAMA_CMAKE_ARGS", "ENABLE"]
    script = f". {env_file}; " + " ".join(f'printf "%s\\0" "$EDGEFLEET_{n}";' for n in names)
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True)
    return dict(zip(names, out.stdout.split("\0")[:-1], strict=True))


@pytest.mark.integration  # runs bash
def test_install_env_carries_the_recipe_to_the_install_step(recipe: Recipe, tmp_path: Path) -> None:
    values = _sourced(install_env(recipe, "edgefleet[device]"), tmp_path)
    assert values["PYTHON"] == "python3.11"
    assert values["REQUIREMENT"] == "edgefleet[device]"
    cmake = values["LLAMA_CMAKE_ARGS"].split()
    assert "-DGGML_CUDA=ON" in cmake
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in cmake  # Orin's GPU
    assert "-DGGML_NATIVE=OFF" in cmake  # never tuned to the machine that compiles it
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in cmake  # the Orin's A78AE cores
    assert values["ENABLE"] == "edgefleet-agent.service"


@pytest.mark.integration  # runs bash
def test_install_env_quotes_what_a_shell_would_split_or_run(recipe: Recipe, tmp_path: Path) -> None:
    odd = recipe.model_copy(update={"enable": ("a.service", "b.service")})
    values = _sourced(install_env(odd, "edgefleet[device]; touch /tmp/x $(id)"), tmp_path)
    assert values["REQUIREMENT"] == "edgefleet[device]; touch /tmp/x $(id)"
    assert values["ENABLE"] == "a.service b.service"


@pytest.mark.integration  # runs bash
def test_install_sh_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


@pytest.mark.integration  # runs bash
@pytest.mark.skipif(platform.machine() == "aarch64", reason="it would install on this machine")
def test_install_sh_refuses_a_machine_that_is_not_aarch64(recipe: Recipe, tmp_path: Path) -> None:
    shutil.copy(SCRIPT, tmp_path / "install.sh")
    (tmp_path / "install.env").write_text(install_env(recipe, "edgefleet[device]"))
    result = subprocess.run(
        ["bash", tmp_path / "install.sh"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    if os.geteuid() == 0:
        assert f"this runs on {platform.machine()}, not aarch64" in result.stderr
    else:
        assert "run it as root" in result.stderr
    assert (tmp_path / "install.sh").exists()  # nothing was removed


@pytest.mark.integration  # runs bash
def test_install_sh_refuses_an_overlay_without_its_install_env(tmp_path: Path) -> None:
    shutil.copy(SCRIPT, tmp_path / "install.sh")
    result = subprocess.run(
        ["bash", tmp_path / "install.sh"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "no " + str(tmp_path / "install.env") in result.stderr


# --- the overlay, built for real ---------------------------------------------------------------


@dataclass(frozen=True)
class Overlay:
    built: Built
    public_pem: bytes
    log: tuple[str, ...]

    @property
    def tarball(self) -> Path:
        return self.built.folder / OVERLAY


def build(folder: Path, cache: Path, key: bytes | None, log: list[str]) -> Built:
    return build_image(
        RECIPE, folder, repo=REPO, cache=cache, console=log.append, private_key=key, epoch=EPOCH
    )


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Overlay:
    top = tmp_path_factory.mktemp("overlay")
    private_pem, public_pem = generate_image_key()
    log: list[str] = []
    built = build(top / "out", top / "cache", private_pem, log)
    return Overlay(built, public_pem, tuple(log))


def members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.integration
@pytest.mark.timeout(900)  # two builds; the first fills pip's cache (about 400 MB)
def test_two_builds_of_the_overlay_are_the_same_bytes(overlay: Overlay, tmp_path: Path) -> None:
    assert any(line.startswith("[5/5] SBOM") for line in overlay.log), overlay.log
    again = build(tmp_path / "again", tmp_path / "cache", None, [])
    for name in (OVERLAY, "manifest.json", "sbom.cdx.json"):
        assert sha256(overlay.built.folder / name) == sha256(again.folder / name), name
    assert overlay.built.manifest == again.manifest


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_every_wheel_is_for_cpython_311_on_aarch64_or_pure(overlay: Overlay) -> None:
    wheels = [
        Path(path).name
        for path in members(overlay.tarball)
        if path.startswith(WHEELHOUSE.lstrip("/")) and path.endswith(".whl")
    ]
    assert len(wheels) > 40
    for wheel in wheels:
        assert "x86_64" not in wheel, wheel
        tags = parse_wheel_filename(wheel)[3]
        fits = [
            t
            for t in tags
            if (t.platform == "any" or t.platform.endswith("_aarch64"))
            and (
                (t.interpreter, t.abi) == ("cp311", "cp311")
                or (t.abi == "abi3" and re.fullmatch(r"cp3(\d|10|11)", t.interpreter))
                or (t.abi == "none" and t.interpreter in ("py3", "py311"))
            )
        ]
        assert fits, wheel
        for tag in fits:  # no manylinux newer than Ubuntu 22.04's glibc 2.35
            if found := re.fullmatch(r"manylinux_2_(\d+)_aarch64", tag.platform):
                assert int(found.group(1)) <= 35, wheel


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_llama_sdist_and_its_build_backend_are_shipped(overlay: Overlay) -> None:
    version = pinned_version((RECIPES / CONSTRAINTS).read_text(), LLAMA_PACKAGE)
    names = {Path(p).name for p in members(overlay.tarball)}
    assert f"llama_cpp_python-{version}.tar.gz" in names
    assert not any(n.startswith("llama_cpp_python-") and n.endswith(".whl") for n in names)
    assert any(n.startswith("scikit_build_core-") for n in names)
    assert any(n.startswith("pathspec-") for n in names)
    assert any(n.startswith("edgefleet-0.1.0-") for n in names)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_files_are_where_the_recipe_says_and_roots(overlay: Overlay, recipe: Recipe) -> None:
    found = members(overlay.tarball)
    with tarfile.open(overlay.tarball) as tar:

        def read(path: str) -> bytes:
            stream = tar.extractfile(f"./{path}")
            assert stream is not None
            return stream.read()

        for path, (source, mode) in FILES.items():
            assert found[path].isfile(), path
            assert found[path].mode == mode, f"{path}: {found[path].mode:o}"
            assert read(path) == (RECIPES / source).read_bytes(), path
        config = read("etc/edgefleet/agent.toml").decode()
        env = read(INSTALL_ENV.lstrip("/")).decode()
    common = (RECIPES / "common/agent.toml").read_text()
    assert config == agent_config(common, recipe) == common  # no model baked in
    assert env == install_env(recipe, "edgefleet[device]")
    for path, info in found.items():
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", ""), path
        assert info.mtime == EPOCH, path
        if info.isdir():
            assert info.mode == 0o755, path
        elif path not in FILES:
            assert info.isfile(), path
            assert info.mode == 0o644, path
    tops = {p.split("/")[0] for p in found if p not in ("", ".")}
    assert tops == {"etc", "opt", "usr"}
    assert not any(p.startswith("etc/systemd/network") for p in found)  # NetworkManager's


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_manifest_and_sbom_list_the_python_packages_and_no_debian(overlay: Overlay) -> None:
    manifest = overlay.built.manifest
    assert manifest.files_from == OVERLAY
    assert set(manifest.artifacts) == {OVERLAY, "sbom.cdx.json"}
    assert manifest.packages.debian == ()
    python = {p.name: p.version for p in manifest.packages.python}
    assert python["edgefleet"] == "0.1.0"
    assert python["llama-cpp-python"] == pinned_version(
        (RECIPES / CONSTRAINTS).read_text(), LLAMA_PACKAGE
    )
    assert "onnxruntime" in python
    assert "onnxruntime-gpu" not in python
    assert not any(name.startswith("gemma3-") for name in python)  # the fleet sends models
    sbom = (overlay.built.folder / "sbom.cdx.json").read_text()
    assert f"pkg:pypi/llama-cpp-python@{python['llama-cpp-python']}" in sbom
    assert '"type": "firmware"' in sbom


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_edgefleet_images_verify_passes(overlay: Overlay, tmp_path: Path) -> None:
    key = tmp_path / "image-key.pub"
    key.write_bytes(overlay.public_pem)
    result = CliRunner().invoke(fleet_cli, ["images", "verify", str(overlay.built.folder),
                                            "--key", str(key)])  # fmt: skip
    assert result.exit_code == 0, result.output
    files = len(overlay.built.manifest.files)
    assert f"verified: {files} files, 2 artifacts" in result.output


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking root's files as root's needs root")
def test_laid_over_a_vendor_root_only_the_overlay_s_files_are_compared(
    overlay: Overlay, tmp_path: Path
) -> None:
    root = tmp_path / "rootfs"  # a stand-in for Linux_for_Tegra/rootfs
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.10").write_bytes(b"\x7fELF")
    subprocess.run(["tar", "xpf", overlay.tarball, "-C", root], check=True)
    folder, public = overlay.built.folder, overlay.public_pem
    assert verify_image(folder, public, root=root).ok
    # The install step removes the wheelhouse; the operator skips it (docs/operators-jetson.md).
    shutil.rmtree(root / WHEELHOUSE.lstrip("/"))
    gone = verify_image(folder, public, root=root)
    assert {m.kind for m in gone.file_mismatches} == {"missing"}
    assert verify_image(folder, public, root=root, ignore=[WHEELHOUSE.lstrip("/")]).ok
    config = root / "etc/edgefleet/agent.toml"
    config.write_text(config.read_text().replace("127.0.0.1", "0.0.0.0"))
    changed = verify_image(folder, public, root=root, ignore=[WHEELHOUSE.lstrip("/")])
    assert [(m.path, m.kind) for m in changed.file_mismatches] == [
        ("etc/edgefleet/agent.toml", "changed")
    ]
