"""'edgefleet models': push, list, show and yank models; scrub the stored files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from fleet.cli.connection import Connection, DataDirOpt, connected
from fleet.cli.output import (
    JsonOpt,
    console,
    fail,
    fleet_errors,
    print_json,
    settings_from,
    size,
    when,
)
from fleet.config import DEFAULT_DATA_DIR
from fleet.registry.variants import VariantRequirements

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="The model registry: push, list, show, yank, scrub.")

ModelArg = Annotated[str, typer.Argument(help="the model")]


def _card(card: Path | None) -> str | None:
    if card is None:
        return None
    try:
        return card.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the model card {card}: {exc}")


def _metadata(metadata_file: Path | None) -> dict[str, Any]:
    if metadata_file is None:
        return {}
    try:
        metadata = json.loads(metadata_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"cannot read the metadata file {metadata_file}: {exc}")
    if not isinstance(metadata, dict):
        fail(f"{metadata_file} must hold a JSON object")
    return metadata


_REQUIREMENT_OPTIONS = {
    "arch": "--arch",
    "gpu": "--gpu",
    "min_compute_capability": "--min-compute-capability",
    "min_l4t": "--min-l4t",
    "runtimes": "--requires-runtime",
}


def _checked(requirements: dict[str, Any], hint: str | None) -> dict[str, Any]:
    """``requirements`` validated and normalised, or a usage error naming the option."""
    try:
        return VariantRequirements.model_validate(requirements).model_dump(mode="json")
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        where = hint or _REQUIREMENT_OPTIONS.get(field, "--gpu")  # "": gpu and compute capability
        raise typer.BadParameter(
            f"{field}: {message}" if hint else message, param_hint=where
        ) from None


def _runtimes(items: list[str]) -> dict[str, str]:
    runtimes = {}
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name.strip() or not version.strip():
            raise typer.BadParameter(
                f"{item!r} is not NAME=VERSION (e.g. llama.cpp=0.3.0)",
                param_hint="--requires-runtime",
            )
        runtimes[name.strip()] = version.strip()
    return runtimes


def _requirements(from_file: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata file's ``requirements`` with the command line's options laid over them."""
    if from_file is None and not any(v is not None for v in options.values()):
        return None
    if from_file is not None and not isinstance(from_file, dict):
        raise typer.BadParameter("requirements must be a JSON object", param_hint="--metadata")
    merged = _checked(from_file or {}, "--metadata")
    for key, value in options.items():
        if value is None:
            continue
        merged[key] = {**merged["runtimes"], **value} if key == "runtimes" else value
    return _checked(merged, None)


@app.command("push")
@connected
def push(
    connection: Connection,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="GGUF or ONNX file")
    ],
    name: Annotated[str, typer.Option(help="model name: lower-case letters, digits, ._-")],
    version: Annotated[str, typer.Option(help="version, e.g. 1.0.0")],
    variant: Annotated[
        str | None, typer.Option(help="variant, e.g. Q4_K_M (default: 'default')")
    ] = None,
    model_format: Annotated[
        str | None,
        typer.Option("--format", help="gguf or onnx (default: from the file's first bytes)"),
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="model card (Markdown)"),
    ] = None,
    context_length: Annotated[
        int | None, typer.Option(min=1, help="the longest context it supports")
    ] = None,
    licence: Annotated[str | None, typer.Option(help="licence, e.g. an SPDX id")] = None,
    quantization: Annotated[
        str | None, typer.Option(help="quantization (default: the variant)")
    ] = None,
    metadata_file: Annotated[
        Path | None,
        typer.Option(
            "--metadata",
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSON: ram_bytes, vram_bytes, requirements, runtime, golden_prompts "
            '([{"prompt", "expect", "max_tokens"}]), ... (docs/updates.md)',
        ),
    ] = None,
    arch: Annotated[
        list[str] | None,
        typer.Option(help="an architecture it runs on, e.g. aarch64 (repeat; default: any)"),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            help="required, preferred or none: where it may run (default: preferred,"
            " docs/variants.md)"
        ),
    ] = None,
    min_compute_capability: Annotated[
        str | None, typer.Option(help="the oldest GPU it runs on, e.g. 8.7")
    ] = None,
    min_l4t: Annotated[
        str | None,
        typer.Option("--min-l4t", help="Jetsons only, the oldest L4T (JetPack), e.g. 36.0"),
    ] = None,
    requires_runtime: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VERSION, a runtime it needs, e.g. llama.cpp=0.3.0 (repeat)"),
    ] = None,
    quality: Annotated[
        int | None,
        typer.Option(min=0, max=1000, help="its rank among variants (default: by quantization)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model file to the registry, streaming it with a progress bar."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    card_text = _card(card)
    metadata = _metadata(metadata_file)
    options = {
        "quantization": quantization or variant,
        "context_length": context_length,
        "licence": licence,
    }
    metadata.update({k: v for k, v in options.items() if v is not None})
    requirements = _requirements(
        metadata.get("requirements"),
        {
            "arch": arch or None,
            "gpu": gpu,
            "min_compute_capability": min_compute_capability,
            "min_l4t": min_l4t,
            "runtimes": _runtimes(requires_runtime) if requires_runtime else None,
        },
    )
    if requirements is not None:
        metadata["requirements"] = requirements
    if quality is not None:
        metadata["quality"] = quality
    params = {"variant": variant, "format": model_format, "filename": file.name}
    path = f"/api/v1/models/{name}/versions/{version}"
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with connection.client() as client:
        with progress:
            task = progress.add_task(f"pushing {file.name}", total=file.stat().st_size)
            created, artifact = client.upload(
                path,
                file,
                params=params,
                metadata={k: v for k, v in metadata.items() if v is not None},
                progress=lambda n: progress.advance(task, n),
            )
        if card_text is not None:
            client.request(
                "PUT",
                f"{path}/card",
                params={"variant": artifact["variant"]},
                content=card_text.encode(),
                headers={"Content-Type": "text/markdown; charset=utf-8"},
            )
    if as_json:
        print_json(artifact)
        return
    what = "pushed" if created else "already registered (identical content)"
    typer.echo(
        f"{what}: {artifact['name']} {artifact['version']} ({artifact['variant']}, "
        f"{artifact['format']}, {size(artifact['size_bytes'])}) sha256 {artifact['sha256']}"
    )


@app.command("list")
@connected
def list_models(connection: Connection, as_json: JsonOpt = False) -> None:
    """Every model, with its latest version that is not yanked."""
    with connection.client() as client:
        models = client.get("/api/v1/models")
    if as_json:
        print_json(models)
        return
    table = Table("name", "latest", "variants", "versions", "updated", box=None)
    for m in models:
        table.add_row(
            m["name"],
            m["latest_version"] or "- (all yanked)",
            ", ".join(m["latest_variants"]) or "-",
            str(m["versions"]),
            when(m["updated_at"]),
        )
    console().print(table)


@app.command("show")
@connected
def show(connection: Connection, name: ModelArg, as_json: JsonOpt = False) -> None:
    """A model's versions and variants, newest first."""
    with connection.client() as client:
        versions = client.get(f"/api/v1/models/{name}")
    if as_json:
        print_json(versions)
        return
    table = Table("version", "variant", "format", "size", "sha256", "uploaded", "yanked", box=None)
    for v in versions:
        for a in v["artifacts"]:
            yanked = f"yes: {a['yank_reason']}" if a["yanked"] else "no"
            table.add_row(
                a["version"],
                a["variant"],
                a["format"],
                size(a["size_bytes"]),
                a["sha256"][:16],
                when(a["created_at"]),
                yanked,
            )
    console().print(table)


@app.command("yank")
@connected
def yank(
    connection: Connection,
    name: ModelArg,
    version: Annotated[str, typer.Argument(help="the version to withdraw")],
    reason: Annotated[str, typer.Option(help="why, shown to admins")],
    variant: Annotated[
        str | None, typer.Option(help="only this variant (default: all of them)")
    ] = None,
) -> None:
    """Withdraw a version: never offered as latest again, still downloadable for rollbacks."""
    body = {"reason": reason, "variant": variant}
    with connection.client() as client:
        result = client.post(f"/api/v1/models/{name}/versions/{version}/yank", body)
    variants = ", ".join(a["variant"] for a in result["artifacts"] if a["yanked"])
    typer.echo(f"yanked {name} {version} ({variants})")


@app.command("scrub")
def scrub(data_dir: DataDirOpt = DEFAULT_DATA_DIR, as_json: JsonOpt = False) -> None:
    """Hash every stored model file against its address; quarantine the changed ones.

    Runs on the controller's data folder, or on its bucket when EDGEFLEET_FLEET_ARTIFACT_*
    name one (a running controller is fine). Exits 1 if any file was corrupt: push those
    models again to restore them.
    """
    from fleet.registry.registration import artifact_store

    settings = settings_from({"data_dir": data_dir})
    out = console()
    with fleet_errors(), out.status("hashing stored artifacts") as status:
        store = artifact_store(settings)  # the folder, or the bucket EDGEFLEET_FLEET_* name
        report = store.scrub(progress=lambda digest: status.update(f"hashed {digest[:12]}"))
    if as_json:
        print_json({"checked": report.checked, "corrupt": report.corrupt})
    else:
        out.print(f"checked {report.checked} artifact(s) in {store.location}")
        for digest, where in report.corrupt.items():
            out.print(f"corrupt: {digest}, moved to {where}")
    if report.corrupt:
        fail(f"{len(report.corrupt)} artifact(s) corrupt: push those models again")
