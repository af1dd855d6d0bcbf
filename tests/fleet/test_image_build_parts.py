"""The pure parts of an image build: llama.cpp's CPU baseline, pins, disk layout, tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fleet.errors import ImageRejected
from fleet.images.build import default_epoch, missing_tools
from fleet.images.pack import disk_layout, sfdisk_script
from fleet.images.recipe import ImageKind, LlamaBuild
from fleet.images.wheels import (
    llama_cmake_args,
    llama_wheel_dir,
    pinned_version,
    resolved_pins,
    target_platforms,
)

RECIPES = Path(__file__).resolve().parents[2] / "firmware-images"


@pytest.mark.parametrize("build", [LlamaBuild.X86_64_V3, LlamaBuild.X86_64_V3_CUDA])
def test_llama_is_built_for_a_stated_baseline_never_the_build_host(build: LlamaBuild) -> None:
    args = llama_cmake_args(build)
    assert "-DGGML_NATIVE=OFF" in args
    assert "-march=x86-64-v3" in args
    assert "native" not in args.replace("GGML_NATIVE=OFF", "")
    assert "-DGGML_AVX512=OFF" in args  # not in x86-64-v3: a v3 CPU would fault on it


def test_each_llama_build_has_its_own_cache_folder(tmp_path: Path) -> None:
    cpu = llama_wheel_dir(tmp_path, "0.3.36", LlamaBuild.X86_64_V3)
    cuda = llama_wheel_dir(tmp_path, "0.3.36", LlamaBuild.X86_64_V3_CUDA)
    newer = llama_wheel_dir(tmp_path, "0.3.37", LlamaBuild.X86_64_V3)
    assert len({cpu, cuda, newer}) == 3
    assert cpu == llama_wheel_dir(tmp_path, "0.3.36", LlamaBuild.X86_64_V3)


def test_the_image_constraints_pin_llama_as_pyproject_does() -> None:
    constraints = (RECIPES / "common/agent-constraints.txt").read_text()
    pyproject = (RECIPES.parent / "pyproject.toml").read_text()
    version = pinned_version(constraints, "llama_cpp_python")  # any spelling of the name
    assert f'"llama-cpp-python=={version}"' in pyproject
    with pytest.raises(ImageRejected, match="does not pin left-pad: add left-pad==VERSION"):
        pinned_version(constraints, "left-pad")


def test_resolved_pins_come_from_pips_report_less_what_the_build_makes() -> None:
    report = {
        "install": [
            {"metadata": {"name": "Jinja2", "version": "3.1.6"}},
            {"metadata": {"name": "edgefleet", "version": "0.1.0"}},
            {"metadata": {"name": "llama_cpp_python", "version": "0.3.36"}},
            {"metadata": {"name": "annotated-types", "version": "0.8.0"}},
        ]
    }
    pins = resolved_pins(json.dumps(report), skip={"edgefleet", "llama-cpp-python"})
    assert pins == ["annotated-types==0.8.0", "jinja2==3.1.6"]


def test_wheels_are_fetched_for_the_images_platform() -> None:
    arm = target_platforms("arm64")
    assert arm[0] == "manylinux_2_35_aarch64"  # Ubuntu 22.04's glibc, the oldest base
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"} <= set(arm)
    assert "manylinux_2_36_aarch64" not in arm
    assert all("aarch64" in tag for tag in arm)
    assert all("x86_64" in tag for tag in target_platforms("amd64"))


def test_the_disk_layout_is_fixed_by_the_recipe_and_fits_the_root() -> None:
    gib = 2**30
    layout = disk_layout("x86_64-cpu", "amd64", 2 * gib)
    assert layout == disk_layout("x86_64-cpu", "amd64", 2 * gib)  # same ids every build
    other = disk_layout("x86_64-nvidia", "amd64", 2 * gib)
    assert {layout.disk_id, layout.root_id}.isdisjoint({other.disk_id, other.root_id})
    assert layout.root_sectors * 512 >= 2 * gib * 1.2  # room for models and logs
    assert layout.root_start == layout.esp_start + layout.esp_sectors
    assert layout.esp_start * 512 == 2**20  # aligned to 1 MiB
    assert layout.total_bytes > (layout.root_start + layout.root_sectors) * 512


@pytest.mark.integration  # runs sfdisk
def test_sfdisk_reads_the_partition_table(tmp_path: Path) -> None:
    layout = disk_layout("x86_64-cpu", "amd64", 10 * 2**20)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
        input=sfdisk_script(layout).encode(),
        check=True,
        capture_output=True,
    )
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True,
                                      capture_output=True).stdout)["partitiontable"]  # fmt: skip
    assert table["id"] == layout.disk_id
    esp, root = table["partitions"]
    assert (root["start"], root["size"], root["uuid"]) == (
        layout.root_start,
        layout.root_sectors,
        layout.root_id,
    )
    assert root["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # root-x86-64: repart grows it
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def test_missing_build_tools_name_their_debian_packages() -> None:
    def nothing(_tool: str) -> None:
        return None

    assert missing_tools(ImageKind.ROOTFS, which=nothing) == [
        "dosfstools", "e2fsprogs", "fdisk", "gzip", "mmdebstrap", "mtools", "tar",
    ]  # fmt: skip
    assert missing_tools(ImageKind.OVERLAY, which=nothing) == ["gzip", "tar"]
    assert missing_tools(ImageKind.ROOTFS, which=lambda tool: f"/usr/bin/{tool}") == []


@pytest.mark.integration  # runs git
def test_the_epoch_is_the_last_commits_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    repo = RECIPES.parent
    commit = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%ct"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert default_epoch(repo) == int(commit)
    with pytest.raises(ImageRejected, match="not a git checkout: set SOURCE_DATE_EPOCH"):
        default_epoch(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert default_epoch(tmp_path) == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ImageRejected, match="'yesterday' is not a number of seconds"):
        default_epoch(tmp_path)
