"""The agent's CLI help reaches users as plain text (typer shows docstrings verbatim)."""

from __future__ import annotations

from collections.abc import Iterator

import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from agent.cli import app

MARKUP = ("``", ":func:", ":class:", ":mod:", ":meth:")


def paths(command: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from paths(sub, (*prefix, name))


def test_every_help_renders_as_plain_text() -> None:
    root = typer.main.get_command(app)
    found = list(paths(root))
    assert len(found) >= 5
    for path in found:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output, path
        for markup in MARKUP:
            assert markup not in result.output, (path, markup)
