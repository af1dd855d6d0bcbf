from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_settings
from agent.errors import ConfigError


def test_toml_file_with_models_and_nested_tables(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'port = 9001\nstore_dir = "/srv/models"\n[log]\npath = "/var/log/x.jsonl"\n'
        '[[models]]\nname = "llm"\n[models.runtime]\nparallel_slots = 2\n'
    )
    settings = load_settings(config)
    assert settings.port == 9001
    assert settings.store_dir == Path("/srv/models")
    assert settings.log.path == Path("/var/log/x.jsonl")
    assert settings.models[0].name == "llm"
    assert settings.models[0].runtime is not None
    assert settings.models[0].runtime.parallel_slots == 2


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("port = 9001\nqueue_size = 5\n")
    monkeypatch.setenv("EDGEFLEET_AGENT_PORT", "9002")
    monkeypatch.setenv("EDGEFLEET_AGENT_LOG__INCLUDE_BODIES", "true")
    settings = load_settings(config)
    assert settings.port == 9002
    assert settings.queue_size == 5
    assert settings.log.include_bodies is True


def test_open_binding_without_a_key_is_refused_and_allowed_with_one() -> None:
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without an API key"):
        load_settings(None, host="0.0.0.0")
    assert load_settings(None, host="0.0.0.0", api_keys=["k"]).host == "0.0.0.0"
    assert load_settings(None, host="::1").host == "::1"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("port = 99999\n", "port"),
        ("unknown_key = 1\n", "unknown_key"),
        ("[[models]]\nname = '../x'\n", "name"),
    ],
)
def test_invalid_configuration_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
