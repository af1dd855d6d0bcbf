"""The overlay of an ``overlay`` recipe (Jetson): a tarball laid over NVIDIA's L4T root.

NVIDIA's flash tools flash a root file system the operator assembles on the flashing
host (``Linux_for_Tegra/rootfs``); the image cannot build that root itself, and an
arm64 venv cannot be made on an amd64 build server. So the overlay ships what the agent
needs, and a script that installs it once inside that root (docs/operators-jetson.md):

- ``/opt/edgefleet-wheelhouse/``: every wheel of ``edgefleet[EXTRAS]`` for CPython 3.11
  on aarch64 (manylinux, glibc 2.35 at most) or pure Python, checked here; the
  llama-cpp-python sdist, compiled there with CUDA for the Orin's GPU; its build
  backend's wheels (``common/build-constraints.txt``); ``constraints.txt``;
  ``install.env``, what the recipe decided (interpreter, requirement, CMake arguments,
  units), which ``install.sh`` reads;
- the recipe's files at their image paths: the systemd unit, sysusers and tmpfiles
  entries, the agent's config, and ``install.sh`` itself (0755).

Everything is root's, 0644 (0755 for folders and the script), dated ``SOURCE_DATE_EPOCH``,
packed by :func:`~fleet.images.pack.pack_tree`, so two builds give the same bytes. The
SBOM lists the Python packages by their file names (no Debian packages: the root's are
NVIDIA's and Ubuntu's, installed by the operator). The pure parts
(:func:`parse_dist_file`, :func:`misfits`, :func:`install_env`) are tested directly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from fleet.errors import ImageRejected
from fleet.images.folder import OVERLAY_SUFFIX
from fleet.images.inventory import PythonPackage
from fleet.images.manifest import SBOM_FILE, ImageManifest, Packages
from fleet.images.pack import pack_tree
from fleet.images.recipe import Recipe
from fleet.images.rootfs import install_files
from fleet.images.sbom import write_sbom
from fleet.images.scan import artifact_of, entries_from_tar
from fleet.images.steps import StepRunner
from fleet.images.wheels import (
    CONSTRAINTS,
    GLIBC,
    LLAMA_PACKAGE,
    llama_cmake_args,
    target_platforms,
)

__all__ = [
    "BUILD_CONSTRAINTS",
    "INSTALL_ENV",
    "INSTALL_SCRIPT",
    "UBUNTU",
    "WHEELHOUSE",
    "DistFile",
    "build_overlay",
    "check_overlay_recipe",
    "install_env",
    "misfits",
    "parse_dist_file",
    "python_packages",
    "target_tags",
]

WHEELHOUSE: Final = "/opt/edgefleet-wheelhouse"  # removed by install.sh once installed
INSTALL_SCRIPT: Final = f"{WHEELHOUSE}/install.sh"
INSTALL_ENV: Final = f"{WHEELHOUSE}/install.env"
BUILD_CONSTRAINTS: Final = "common/build-constraints.txt"
UBUNTU: Final = "ubuntu-22.04"  # L4T R36's distribution, for the SBOM
_FILE_MODE: Final = 0o644
_EXEC_MODE: Final = 0o755


@dataclass(frozen=True)
class DistFile:
    """A wheel or sdist of the wheelhouse, as its file name says."""

    filename: str
    name: str  # canonical (PEP 503)
    version: str
    tags: frozenset[Tag]  # empty for an sdist

    @property
    def is_sdist(self) -> bool:
        return not self.tags


def parse_dist_file(filename: str) -> DistFile:
    """What a wheel's or an sdist's file name says; anything else is rejected."""
    try:
        if filename.endswith(".whl"):
            name, version, _build, tags = parse_wheel_filename(filename)
            return DistFile(filename, str(name), str(version), frozenset(tags))
        if filename.endswith(".tar.gz"):
            name, version = parse_sdist_filename(filename)
            return DistFile(filename, str(name), str(version), frozenset())
    except (InvalidWheelFilename, InvalidSdistFilename) as exc:
        raise ImageRejected(f"the wheelhouse holds {filename!r}, not a package: {exc}") from None
    raise ImageRejected(f"the wheelhouse holds {filename!r}, neither a wheel nor an sdist")


def target_tags(python: str, arch: str) -> frozenset[Tag]:
    """The wheel tags CPython ``python`` (3.11) on ``arch`` (arm64) installs."""
    version = tuple(int(part) for part in python.split("."))
    platforms = target_platforms(arch)  # manylinux_2_35 down to 2_17, and linux_
    abi = f"cp{''.join(python.split('.'))}"
    return frozenset(
        [
            *cpython_tags(version, abis=[abi], platforms=platforms),
            *compatible_tags(version, interpreter=abi, platforms=platforms),
        ]
    )


def misfits(files: list[DistFile], python: str, arch: str, *, sdists: set[str]) -> list[str]:
    """Why each file cannot install on the image: no fitting tag, or an unexpected sdist.

    ``sdists`` names the packages shipped as source on purpose (llama-cpp-python, built
    on the device); any other sdist would need a compiler the image does not plan for.
    """
    fits = target_tags(python, arch)
    wanted = {canonicalize_name(s) for s in sdists}
    problems = []
    for dist in sorted(files, key=lambda d: d.filename):
        if dist.is_sdist and dist.name not in wanted:
            problems.append(f"{dist.filename}: an sdist; pin a version with a wheel")
        elif not dist.is_sdist and not dist.tags & fits:
            problems.append(
                f"{dist.filename}: not for CPython {python} on {arch} (manylinux, glibc "
                f"2.{GLIBC.split('_')[1]} at most): pin a version that has such a wheel"
            )
    return problems


def python_packages(files: list[DistFile]) -> list[PythonPackage]:
    """The packages of the wheelhouse, once each, sorted by name: for the SBOM and manifest."""
    found = {(d.name, d.version) for d in files}
    return [PythonPackage(name=n, version=v) for n, v in sorted(found)]


def check_overlay_recipe(recipe: Recipe) -> None:
    """Refuse an overlay recipe its install step cannot work with; say what is missing."""
    if recipe.vendor is None:
        raise ImageRejected(f"{recipe.name}: an overlay recipe needs a [vendor] base")
    if INSTALL_SCRIPT not in recipe.files:
        raise ImageRejected(
            f"{recipe.name}: an overlay recipe installs its install step at {INSTALL_SCRIPT} "
            f'([files] "{INSTALL_SCRIPT}" = "{recipe.name}/install.sh")'
        )
    if INSTALL_ENV in recipe.files:
        raise ImageRejected(f"{recipe.name}: {INSTALL_ENV} is written by the build, not a file")
    if recipe.agent.bake_models:
        raise ImageRejected(
            f"{recipe.name}: an overlay bakes in no models (bake_models = []): the first "
            "rollout brings them, and the overlay does not carry them twice"
        )


def install_env(recipe: Recipe, requirement: str) -> str:
    """``install.env``: what the recipe decided, as shell assignments ``install.sh`` reads."""
    assert recipe.vendor is not None
    values = {
        "EDGEFLEET_PYTHON": recipe.vendor.python,
        "EDGEFLEET_REQUIREMENT": requirement,
        "EDGEFLEET_LLAMA_CMAKE_ARGS": llama_cmake_args(recipe.agent.llama),
        "EDGEFLEET_ENABLE": " ".join(recipe.enable),
    }
    lines = [f"# Written by the image build from firmware-images/{recipe.name}/recipe.toml."]
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _inside(root: Path, image_path: str) -> Path:
    return root / image_path.lstrip("/")


def _fetch_build_backend(
    runner: StepRunner, recipe: Recipe, pip: Path, recipes: Path, dest: Path
) -> None:
    """The pinned wheels llama-cpp-python's sdist builds with, for the image's platform."""
    platforms = [a for p in target_platforms(recipe.arch) for a in ("--platform", p)]
    runner.run(
        [pip, "download", "--no-deps", "--progress-bar", "off", "-d", dest,
         "--only-binary", ":all:", *platforms, "--implementation", "cp",
         "--python-version", recipe.python, "-r", recipes / BUILD_CONSTRAINTS],
    )  # fmt: skip


def _stage(recipe: Recipe, root: Path, wheelhouse: Path, recipes: Path, requirement: str) -> None:
    """The overlay's tree: the wheelhouse, install.env and the recipe's files."""
    staged = _inside(root, WHEELHOUSE)
    staged.mkdir(mode=0o755, parents=True, exist_ok=True)
    for wheel in sorted(wheelhouse.iterdir()):
        shutil.copyfile(wheel, staged / wheel.name)
    shutil.copyfile(recipes / CONSTRAINTS, staged / "constraints.txt")
    _inside(root, INSTALL_ENV).write_text(install_env(recipe, requirement), encoding="utf-8")
    install_files(recipe, root, recipes)


def _normalise(root: Path, epoch: int) -> None:
    """Modes and dates that do not depend on the checkout or the build machine."""
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(_EXEC_MODE)
        else:
            path.chmod(_FILE_MODE)
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    _inside(root, INSTALL_SCRIPT).chmod(_EXEC_MODE)


def _check_wheelhouse(recipe: Recipe, staged: Path) -> list[DistFile]:
    """The packages of the staged wheelhouse; rejected, each named, unless all fit the image."""
    ours = {Path(INSTALL_SCRIPT).name, Path(INSTALL_ENV).name, "constraints.txt"}
    files = [parse_dist_file(p.name) for p in sorted(staged.iterdir()) if p.name not in ours]
    problems = misfits(files, recipe.python, recipe.arch, sdists={LLAMA_PACKAGE})
    if problems:
        raise ImageRejected(
            f"{len(problems)} packages of the wheelhouse would not install on {recipe.name}:\n  "
            + "\n  ".join(problems)
        )
    if not any(d.is_sdist for d in files):
        raise ImageRejected(f"the wheelhouse has no {LLAMA_PACKAGE} sdist to build on the device")
    return files


def build_overlay(
    runner: StepRunner, recipe: Recipe, out: Path, work: Path, *,
    requirement: str, recipes: Path, version: str, epoch: int, built_with: str,
) -> ImageManifest:  # fmt: skip
    """Steps 2 to 5 of an overlay build (:mod:`fleet.images.build`); its manifest."""
    root = work / "overlay"
    staged = _inside(root, WHEELHOUSE)
    staged.mkdir(mode=0o755, parents=True)
    runner.step(f"llama.cpp's build backend for the device ({BUILD_CONSTRAINTS}, pinned)")
    pip = Path(sys.executable).parent / "pip"  # the build's own venv, as for the wheelhouse
    _fetch_build_backend(runner, recipe, pip, recipes, staged)
    runner.step(f"the overlay: the wheelhouse at {WHEELHOUSE}, the install step, the agent's files")
    _stage(recipe, root, work / "wheelhouse", recipes, requirement)
    files = _check_wheelhouse(recipe, staged)
    _normalise(root, epoch)
    tarball = f"{recipe.name}{OVERLAY_SUFFIX}"
    runner.step(f"packing {tarball} (reproducible tar, root's, gzip -n)")
    pack_tree(runner, root, out / tarball, epoch, owner_root=True)
    runner.step("SBOM (CycloneDX) and manifest: every package and every file's sha256")
    python = python_packages(files)
    write_sbom(python, [], out / SBOM_FILE, name=recipe.name, version=version, distro=UBUNTU,
               source_date_epoch=epoch)  # fmt: skip
    return ImageManifest(
        recipe=recipe.name,
        version=version,
        arch=recipe.arch,
        device_class=recipe.name,
        source_date_epoch=epoch,
        built_with=built_with,
        artifacts={name: artifact_of(out / name) for name in (tarball, SBOM_FILE)},
        files_from=tarball,
        packages=Packages(python=tuple(python)),
        files=tuple(entries_from_tar(out / tarball)),
    )
