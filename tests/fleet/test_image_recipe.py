"""Recipes: the real ones load, and a bad or unknown one is refused with what is wrong."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from fleet.errors import ImageRejected
from fleet.images.recipe import ImageKind, LlamaBuild, known_recipes, load_recipe, parse_recipe
from fleet.images.rootfs import agent_config

RECIPES = Path(__file__).resolve().parents[2] / "firmware-images"


def recipe_text(**changes: object) -> str:
    """The x86_64-cpu recipe with top-level keys or tables replaced (None: removed)."""
    data = tomllib.loads((RECIPES / "x86_64-cpu" / "recipe.toml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {_toml(value)}")
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{_toml(k)} = {_toml(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def test_every_device_class_has_a_recipe_that_loads() -> None:
    assert known_recipes(RECIPES) == ["jetson-orin", "x86_64-cpu", "x86_64-nvidia"]
    cpu = load_recipe(RECIPES, "x86_64-cpu")
    assert cpu.kind is ImageKind.ROOTFS
    assert cpu.agent.llama is LlamaBuild.X86_64_V3  # never tuned to the build host
    assert "edgefleet-agent.service" in cpu.enable
    nvidia = load_recipe(RECIPES, "x86_64-nvidia")
    assert nvidia.agent.extras == ("device-gpu",)  # onnxruntime-gpu, no model packages
    jetson = load_recipe(RECIPES, "jetson-orin")
    assert (jetson.kind, jetson.arch) == (ImageKind.OVERLAY, "arm64")


def test_an_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(ImageRejected, match="unknown recipe 'raspberry-pi'; known recipes: ") as e:
        load_recipe(RECIPES, "raspberry-pi")
    assert "x86_64-cpu" in str(e.value)


def test_an_unpinned_package_is_refused() -> None:
    debian = tomllib.loads((RECIPES / "x86_64-cpu" / "recipe.toml").read_text())["debian"]
    debian["packages"] = [*debian["packages"], "curl"]
    with pytest.raises(ImageRejected, match=r"pin every package as name=version.*: curl"):
        parse_recipe(recipe_text(debian=debian), "r.toml")


def test_a_rootfs_recipe_needs_a_debian_base() -> None:
    with pytest.raises(ImageRejected, match=r"a rootfs recipe has a \[debian\] base"):
        parse_recipe(recipe_text(debian=None), "r.toml")


def test_unknown_keys_and_bad_values_are_named() -> None:
    with pytest.raises(ImageRejected, match=r"r.toml: .*colour.*Extra inputs"):
        parse_recipe(recipe_text(colour="blue"), "r.toml")
    with pytest.raises(ImageRejected, match=r"kind: Input should be 'rootfs' or 'overlay'"):
        parse_recipe(recipe_text(kind="iso"), "r.toml")
    with pytest.raises(ImageRejected, match="is not valid TOML"):
        parse_recipe("name = ", "r.toml")


def test_files_must_exist_and_go_to_plain_absolute_paths() -> None:
    files = {"/etc/edgefleet/agent.toml": "common/nope.toml"}
    with pytest.raises(ImageRejected, match=r"installs files that do not exist: common/nope\.toml"):
        parse_recipe(recipe_text(files=files), "r.toml", ["common/agent.toml"])
    with pytest.raises(ImageRejected, match="image paths must be absolute and plain"):
        parse_recipe(recipe_text(files={"/etc/../root/x": "common/agent.toml"}), "r.toml")


def test_a_recipe_must_be_named_as_its_folder(tmp_path: Path) -> None:
    shutil.copytree(RECIPES / "common", tmp_path / "common")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "recipe.toml").write_text(recipe_text())
    with pytest.raises(ImageRejected, match="names itself 'x86_64-cpu': rename one to match"):
        load_recipe(tmp_path, "other")


def test_baked_models_are_served_by_the_images_config() -> None:
    recipe = load_recipe(RECIPES, "x86_64-cpu")
    config = tomllib.loads(agent_config((RECIPES / "common/agent.toml").read_text(), recipe))
    assert config["models"] == [{"name": "gemma3-270m"}]
    assert config["fleet"]["state_dir"] == "/var/lib/edgefleet/agent"
    assert config["store_dir"] == "/var/lib/edgefleet/models"
    unbaked = recipe.model_copy(
        update={"agent": recipe.agent.model_copy(update={"bake_models": ()})}
    )
    assert "models" not in tomllib.loads(agent_config("port = 1\n", unbaked))
