"""Build an image from its recipe: ``edgefleet images build RECIPE --out DIR``.

What a build of a ``rootfs`` recipe does, step by step (each shown as it runs, each
command's output in ``OUT/build.log``):

1. the wheelhouse: edgefleet's wheel, llama.cpp for the recipe's CPU baseline (cached),
   and every other package for the image's platform, pinned (:mod:`fleet.images.wheels`);
2. Debian's packages by mmdebstrap, then the agent's venv, files, user, units and baked-in
   models, in a scratch folder (:mod:`fleet.images.rootfs`);
3. the artifacts: ``RECIPE.rootfs.tar.gz`` and ``RECIPE.img`` (:mod:`fleet.images.pack`);
4. ``sbom.cdx.json`` and ``manifest.json``, signed into ``manifest.sig`` when an image key
   is given (:mod:`fleet.images.folder`).

An ``overlay`` recipe (Jetson) ships its wheelhouse and an install step instead of a
root file system (:mod:`fleet.images.overlay`). Every date is ``SOURCE_DATE_EPOCH``: by
default the time of the checkout's last commit, so two builds of one commit are the
same bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Final

from fleet.errors import ImageRejected
from fleet.images.folder import write_manifest, write_signature
from fleet.images.inventory import (
    debian_packages_from_status,
    distro_from_os_release,
    python_packages_from_site,
)
from fleet.images.manifest import ImageManifest, Packages
from fleet.images.pack import pack_tree, raw_image
from fleet.images.recipe import ImageKind, Recipe, load_recipe
from fleet.images.rootfs import (
    VENV,
    bake_models,
    debian_base,
    enable_units,
    finish_root,
    install_agent,
    install_files,
    mounted,
)
from fleet.images.sbom import write_sbom
from fleet.images.scan import artifact_of, entries_from_tar
from fleet.images.steps import Console, StepRunner
from fleet.images.wheels import build_wheelhouse

__all__ = ["BUILD_TOOLS", "Built", "build_image", "default_epoch", "missing_tools"]

BUILD_TOOLS: Final = {  # command -> the Debian package that has it
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "tar": "tar",
    "gzip": "gzip",
}
SBOM_FILE: Final = "sbom.cdx.json"
LOG_FILE: Final = "build.log"


@dataclass(frozen=True)
class Built:
    """A finished build: its folder, manifest and how long it took."""

    folder: Path
    manifest: ImageManifest
    signed: bool
    seconds: float


def missing_tools(kind: ImageKind, which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The Debian packages to install before a build of ``kind`` can run."""
    needed = BUILD_TOOLS if kind is ImageKind.ROOTFS else {"tar": "tar", "gzip": "gzip"}
    return sorted({package for tool, package in needed.items() if which(tool) is None})


def default_epoch(repo: Path) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the checkout's last commit time."""
    if value := os.environ.get("SOURCE_DATE_EPOCH"):
        if not value.isdigit():
            raise ImageRejected(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
        return int(value)
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%ct"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if not out.isdigit():
        raise ImageRejected(
            f"{repo} is not a git checkout: set SOURCE_DATE_EPOCH (seconds) for the image's dates"
        )
    return int(out)


def _check_can_build(recipe: Recipe) -> None:
    missing = missing_tools(recipe.kind)
    if missing:
        raise ImageRejected(
            f"building {recipe.name} needs {', '.join(missing)}: "
            f"sudo apt-get install {' '.join(missing)} (scripts/build-image installs them)"
        )
    if recipe.kind is ImageKind.ROOTFS and os.geteuid() != 0:
        raise ImageRejected(
            f"building the {recipe.name} root file system needs root (mmdebstrap, chroot, "
            "device nodes): run it with sudo"
        )


def _rootfs(
    runner: StepRunner, recipe: Recipe, out: Path, work: Path, *,
    recipes: Path, requirement: str, epoch: int,
) -> None:  # fmt: skip
    """Steps 2 and 3 of a root file system build (the module's docstring)."""
    root = work / "root"
    runner.step(f"Debian base by mmdebstrap ({recipe.base}, {recipe.arch})")
    debian_base(runner, recipe, root, epoch)
    with mounted(root):
        runner.step(f"the agent's venv at {VENV} ({requirement}, offline)")
        install_agent(runner, recipe, root, work / "wheelhouse", requirement,
                      recipes=recipes, epoch=epoch)  # fmt: skip
        runner.step("the agent's files, user, folders and systemd units")
        install_files(recipe, root, recipes)
        enable_units(runner, recipe, root, epoch)
        runner.step(f"baking in models: {', '.join(recipe.agent.bake_models) or 'none'}")
        bake_models(runner, recipe, root, epoch)
        runner.step("bytecode, host name, file systems; first-boot state left empty")
        finish_root(runner, recipe, root, epoch)
    runner.step(f"packing {recipe.name}.rootfs.tar.gz (reproducible tar, gzip -n)")
    pack_tree(runner, root, out / f"{recipe.name}.rootfs.tar.gz", epoch, owner_root=False)
    runner.step(f"the raw disk image {recipe.name}.img (GPT: ESP with systemd-boot, ext4 root)")
    raw_image(runner, recipe.name, recipe.arch, root, out / f"{recipe.name}.img", epoch)


def build_image(
    name: str,
    out: Path,
    *,
    repo: Path,
    cache: Path,
    console: Console,
    version: str | None = None,
    private_key: bytes | None = None,
    epoch: int | None = None,
) -> Built:
    """Build recipe ``name`` from ``repo``'s firmware-images/ into the folder ``out``."""
    recipes = repo / "firmware-images"
    recipe = load_recipe(recipes, name)
    if recipe.kind is ImageKind.OVERLAY:
        from fleet.images.overlay import check_overlay_recipe

        check_overlay_recipe(recipe)
    _check_can_build(recipe)
    epoch = default_epoch(repo) if epoch is None else epoch
    built_with = dist_version("edgefleet")
    if version is None:
        version = f"{built_with}+{datetime.fromtimestamp(epoch, UTC):%Y%m%d}"
    out.mkdir(parents=True, exist_ok=True)
    if any(p.name != LOG_FILE for p in out.iterdir()):
        raise ImageRejected(f"{out} is not empty: give a new folder for the image")
    pip = Path(sys.executable).parent / "pip"  # the build's own venv
    old_umask = os.umask(0o022)  # the modes of every file the build makes
    try:
        with (out / LOG_FILE).open("w", encoding="utf-8") as log:
            total = 5 if recipe.kind is ImageKind.OVERLAY else 9
            runner = StepRunner(log, console, total)
            work = out / ".work"
            shutil.rmtree(work, ignore_errors=True)
            try:
                runner.step(f"wheelhouse for {recipe.name}: Python {recipe.python}, {recipe.arch}")
                requirement = build_wheelhouse(
                    runner, recipe, repo=repo, recipes=recipes, cache=cache, pip=pip,
                    dest=work / "wheelhouse", epoch=epoch,
                )  # fmt: skip
                if recipe.kind is ImageKind.ROOTFS:
                    _rootfs(runner, recipe, out, work, epoch=epoch, recipes=recipes,
                            requirement=requirement)  # fmt: skip
                    manifest = _describe(
                        runner, recipe, out, work / "root", version, epoch, built_with
                    )
                else:
                    from fleet.images.overlay import build_overlay

                    manifest = build_overlay(
                        runner, recipe, out, work, requirement=requirement, recipes=recipes,
                        version=version, epoch=epoch, built_with=built_with,
                    )  # fmt: skip
                raw = write_manifest(out, manifest)
                if private_key is not None:
                    write_signature(out, raw, private_key)
                seconds = runner.finish()
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        os.umask(old_umask)
    return Built(out, manifest, private_key is not None, seconds)


def _describe(
    runner: StepRunner, recipe: Recipe, out: Path, root: Path, version: str, epoch: int,
    built_with: str,
) -> ImageManifest:  # fmt: skip
    """The SBOM and the manifest of a root file system build."""
    runner.step("SBOM (CycloneDX) and manifest: every package and every file's sha256")
    site = next((root / VENV.lstrip("/")).glob("lib/python*/site-packages"))
    python = python_packages_from_site(site)
    debian = debian_packages_from_status(root / "var/lib/dpkg/status")
    write_sbom(
        python, debian, out / SBOM_FILE, name=recipe.name, version=version,
        distro=distro_from_os_release(root / "etc/os-release"), source_date_epoch=epoch,
    )  # fmt: skip
    tarball = f"{recipe.name}.rootfs.tar.gz"
    artifacts = {
        name: artifact_of(out / name) for name in (tarball, f"{recipe.name}.img", SBOM_FILE)
    }
    return ImageManifest(
        recipe=recipe.name,
        version=version,
        arch=recipe.arch,
        device_class=recipe.name,
        source_date_epoch=epoch,
        built_with=built_with,
        artifacts=artifacts,
        files_from=tarball,
        packages=Packages(debian=tuple(debian), python=tuple(python)),
        files=tuple(entries_from_tar(out / tarball)),
    )
