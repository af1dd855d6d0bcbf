"""What 'devices desired' and 'groups desired' share: the --model and --clear options."""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = ["ClearOpt", "ModelOpt", "desired_body", "published"]

ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="NAME, NAME@VERSION or NAME@VERSION:VARIANT to run (repeatable); a registered "
        "model is sent as its signed target",
    ),
]
ClearOpt = Annotated[bool, typer.Option("--clear", help="run no models at all")]


def desired_body(model: list[str] | None, clear: bool) -> dict[str, Any]:
    """The API body for ``--model`` specs (or ``--clear``); a usage error when neither fits."""
    if not model and not clear:
        raise typer.BadParameter("give at least one --model NAME[@VERSION], or --clear")
    if model and clear:
        raise typer.BadParameter("--clear runs no models: drop the --model options")
    models = []
    for spec in model or []:
        name, _, rest = spec.partition("@")
        version, _, variant = rest.partition(":")
        if not name:
            raise typer.BadParameter(
                f"{spec!r} is not NAME[@VERSION[:VARIANT]]", param_hint="--model"
            )
        models.append({"name": name, "version": version or None, "variant": variant or None})
    return {"models": models}


def published(result: dict[str, Any]) -> str:
    """One line saying whether a stored desired state reached the broker."""
    state = "published" if result["published"] else "stored; publishes when the broker is back"
    return f"{result['device_id']}: desired version {result['version']} {state}"
