"""The configuration examples in the docs are what the code accepts, so they stay true."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from agent.config import load_settings
from models.policy import FallbackPolicy

DOCS = Path(__file__).resolve().parent.parent / "docs"


def toml_blocks(doc: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", (DOCS / doc).read_text(), flags=re.S)


def test_the_operators_guide_configuration_loads(tmp_path: Path) -> None:
    (text,) = toml_blocks("operators.md")
    config = tmp_path / "agent.toml"
    config.write_text(text)
    block: dict[str, Any] = tomllib.loads(text)
    settings = load_settings(config)
    assert settings.fallback is not None
    assert settings.fallback.chains["gemma3-270m"].tiers[0].kind == "rules"
    assert [m.name for m in settings.models] == [m["name"] for m in block["models"]]


def test_the_policy_guide_example_is_a_valid_policy() -> None:
    block = tomllib.loads(toml_blocks("policies.md")[0])
    body = {k: v for k, v in block.items() if k != "description"}
    policy = FallbackPolicy.model_validate({"name": "lab", "version": 1, **body})
    assert [t.kind for t in policy.chains["gemma3-270m"].tiers] == [
        "model",
        "model",
        "cache",
        "rules",
    ]
