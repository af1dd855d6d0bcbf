"""Pack a built root into its artifacts: a reproducible tarball and a raw disk image.

The tarball is the same bytes from two builds of the same tree: members sorted by name,
times clamped to ``SOURCE_DATE_EPOCH``, numeric owners, no access or change times, and
gzip without a name or time. The raw disk image is a GPT disk with an EFI system
partition (systemd-boot, the kernel and its initrd) and the root file system (ext4,
made from the tree by ``mkfs.ext4 -d``, no loop devices or mounts); its partitions have
fixed ids, derived from the recipe's name, so a boot entry can name the root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.errors import ImageBuildFailed
from fleet.images.rootfs import ESP_LABEL, ROOT_LABEL
from fleet.images.steps import StepRunner

__all__ = ["DiskLayout", "clamp_times", "disk_layout", "pack_tree", "raw_image", "sfdisk_script"]

MIB: Final = 2**20
SECTOR: Final = 512
ESP_MIB: Final = 256
ESP_TYPE: Final = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPES: Final = {  # the Discoverable Partitions Specification's root types
    "amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
_IDS: Final = uuid.UUID("6f1d0c52-4b8e-4f6a-9d3c-2a7e5b90c1e4")  # namespace of the fixed ids


def pack_tree(runner: StepRunner, root: Path, out: Path, epoch: int, *, owner_root: bool) -> None:
    """``root`` as a gzipped tarball at ``out``; ``owner_root``: every member root's."""
    owners = ["--owner=0", "--group=0"] if owner_root else []
    runner.run(
        [
            "tar", "--create", f"--file={out}", f"--directory={root}",
            "--sort=name", f"--mtime=@{epoch}", "--clamp-mtime", "--numeric-owner", *owners,
            "--format=pax", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "--xattrs", "--xattrs-include=security.capability", "--one-file-system",
            "--use-compress-program=gzip -n -6", ".",
        ]
    )  # fmt: skip


@dataclass(frozen=True)
class DiskLayout:
    """Where the partitions of a raw image go, in 512-byte sectors, and their ids."""

    disk_id: str
    esp_id: str
    root_id: str
    root_type: str
    esp_start: int
    esp_sectors: int
    root_start: int
    root_sectors: int

    @property
    def total_bytes(self) -> int:
        return (self.root_start + self.root_sectors + 34) * SECTOR  # + the backup GPT


def disk_layout(name: str, arch: str, root_bytes: int) -> DiskLayout:
    """A disk for a root of ``root_bytes``, with room to spare; ids fixed by ``name``."""
    root_mib = -(-int(root_bytes * 1.2 + 512 * MIB) // (64 * MIB)) * 64  # 64 MiB steps
    esp_start = MIB // SECTOR
    esp_sectors = ESP_MIB * MIB // SECTOR

    def fixed(part: str) -> str:
        return str(uuid.uuid5(_IDS, f"{name}/{part}")).upper()

    return DiskLayout(
        disk_id=fixed("disk"),
        esp_id=fixed("esp"),
        root_id=fixed("root"),
        root_type=ROOT_TYPES[arch],
        esp_start=esp_start,
        esp_sectors=esp_sectors,
        root_start=esp_start + esp_sectors,
        root_sectors=root_mib * MIB // SECTOR,
    )


def sfdisk_script(layout: DiskLayout) -> str:
    """The partition table, as ``sfdisk`` reads it."""
    return (
        f"label: gpt\nlabel-id: {layout.disk_id}\nunit: sectors\n\n"
        f"start={layout.esp_start}, size={layout.esp_sectors}, type={ESP_TYPE}, "
        f'uuid={layout.esp_id}, name="esp"\n'
        f"start={layout.root_start}, size={layout.root_sectors}, type={layout.root_type}, "
        f'uuid={layout.root_id}, name="root"\n'
    )


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*") if not p.is_dir())


def _place(part: Path, disk: Path, offset: int) -> None:
    """Copy a partition's image into the disk at ``offset``, leaving zero runs as holes."""
    chunk = 4 * MIB
    zero = bytes(chunk)
    with part.open("rb") as src, disk.open("r+b") as dst:
        position = offset
        while block := src.read(chunk):
            if block != zero[: len(block)]:
                dst.seek(position)
                dst.write(block)
            position += len(block)


def clamp_times(tree: Path, epoch: int) -> None:
    """Set every time in ``tree`` newer than ``epoch`` to it, as ``tar --clamp-mtime`` does."""
    for folder, dirs, files in os.walk(tree):  # never into a symlinked folder
        for name in (".", *dirs, *files):
            path = os.path.join(folder, name)  # noqa: PTH118 (hot loop over a whole root)
            st = os.lstat(path)
            if st.st_mtime > epoch or st.st_atime > epoch:
                os.utime(path, (epoch, min(st.st_mtime, epoch)), follow_symlinks=False)


def _boot_files(root: Path) -> tuple[Path, Path, Path]:
    efi = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not efi.is_file() or not kernels or not initrds:
        raise ImageBuildFailed(
            f"{root} has no systemd-boot, kernel or initrd to boot from: a raw image needs "
            "the recipe to install systemd-boot-efi, linux-image-* and initramfs-tools"
        )
    return efi, kernels[-1], initrds[-1]


def raw_image(
    runner: StepRunner, name: str, arch: str, root: Path, out: Path, epoch: int
) -> DiskLayout:
    """A bootable GPT disk image of ``root`` at ``out`` (sparse): ESP and ext4 root."""
    efi, kernel, initrd = _boot_files(root)
    layout = disk_layout(name, arch, _tree_bytes(root))
    env = {"SOURCE_DATE_EPOCH": str(epoch), "E2FSPROGS_FAKE_TIME": str(epoch)}
    with tempfile.TemporaryDirectory(prefix="edgefleet-disk-", dir=out.parent) as tmp:
        scratch = Path(tmp)
        esp = scratch / "esp.img"
        runner.run(["mkfs.vfat", "-C", "-F", "32", "-n", ESP_LABEL, "-i", layout.esp_id[:8],
                    esp, str(ESP_MIB * 1024)], env=env)  # fmt: skip
        tree = scratch / "esp"
        for source, target in (
            (efi, "EFI/BOOT/BOOTX64.EFI"),
            (kernel, "vmlinuz"),
            (initrd, "initrd.img"),
        ):
            (tree / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tree / target)
        (tree / "loader/entries").mkdir(parents=True)
        (tree / "loader/loader.conf").write_text("default edgefleet.conf\ntimeout 0\n")
        (tree / "loader/entries/edgefleet.conf").write_text(
            f"title edgefleet ({name})\nlinux /vmlinuz\ninitrd /initrd.img\n"
            f"options root=PARTUUID={layout.root_id.lower()} rw console=tty0 console=ttyS0,115200\n"
        )
        clamp_times(tree, epoch)
        runner.run(["mcopy", "-i", esp, "-s", "-m", "-Q", *sorted(tree.iterdir()), "::/"], env=env)
        clamp_times(root, epoch)  # ext4 keeps each file's times
        part = scratch / "root.img"
        runner.run(
            ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", layout.root_id.lower(),
             "-E", f"hash_seed={layout.disk_id.lower()}", "-d", root, part,
             f"{layout.root_sectors * SECTOR // 1024}k"],
            env=env,
        )  # fmt: skip
        out.unlink(missing_ok=True)
        with out.open("wb") as disk:
            disk.truncate(layout.total_bytes)
        (scratch / "table").write_text(sfdisk_script(layout))
        with (scratch / "table").open("rb") as table:
            runner.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out], stdin=table)
        _place(esp, out, layout.esp_start * SECTOR)
        _place(part, out, layout.root_start * SECTOR)
    return layout
