"""'edgefleet images': the image key, and signing, verifying and showing built images.

No controller is needed: every command works on files. IMAGE is an image's output
folder (or its ``manifest.json``). ``verify`` exits 0 when everything matches, 2 when
the signature, an artifact or a file does not (each named), like any other problem the
operator must look at before flashing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from fleet.cli.output import fail, print_json, size
from fleet.errors import ConfigError, ImageBuildFailed, ImageRejected
from fleet.files import PRIVATE_FILE, PUBLIC_FILE, atomic_write

if TYPE_CHECKING:
    from fleet.images.folder import Meter
    from fleet.images.manifest import ImageManifest, Mismatch
    from fleet.images.scan import Progress

__all__ = ["app"]

app = typer.Typer(
    no_args_is_help=True,
    help="Firmware images: build one from its recipe, keygen (the image key), sign, verify "
    "and show a built image.",
)

PRIVATE_KEY_FILE = "image-key.pem"
PUBLIC_KEY_FILE = "image-key.pub"
SHOWN = 20  # mismatches printed before "... and N more"

ImageArg = Annotated[
    Path,
    typer.Argument(exists=True, help="the image's output folder, or its manifest.json"),
]


@contextmanager
def _image_errors() -> Iterator[None]:
    """A rejected image or an unusable key is one red line and status 2."""
    try:
        yield
    except (ImageRejected, ConfigError) as exc:
        fail(str(exc), code=2)


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read the key {path}: {exc}", code=2)


def _read_manifest(folder: Path) -> bytes:
    from fleet.images.manifest import MANIFEST_FILE

    try:
        return (folder / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read {folder / MANIFEST_FILE}: {exc}") from None


@contextmanager
def _meter() -> Iterator[Meter]:
    """Progress bars on stderr for each large read; nothing when stderr is not a terminal."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bars

    err = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Bars(*columns, console=err, transient=True, disable=not err.is_terminal) as bars:

        def start(label: str, total: int | None) -> Progress:
            for task in bars.task_ids:
                bars.update(task, visible=False)
            task = bars.add_task(label, total=total)
            return lambda n: bars.advance(task, n)

        yield start


def _repo() -> Path:
    """The checkout whose firmware-images/ holds the recipes (this package's parent)."""
    return Path(__file__).resolve().parents[2]


@app.command("recipes")
def recipes() -> None:
    """List the recipes under firmware-images/: one per device class."""
    from fleet.images.recipe import known_recipes, load_recipe

    root = _repo() / "firmware-images"
    with _image_errors():
        for name in known_recipes(root):
            recipe = load_recipe(root, name)
            typer.echo(f"{name:16} {recipe.kind.value:8} {recipe.arch:6} {recipe.description}")


@app.command("build")
def build(
    recipe: Annotated[
        str, typer.Argument(help="the recipe: `edgefleet images recipes` lists them")
    ],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="a new folder for the image")],
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            exists=True,
            dir_okay=False,
            help="the image private key: sign the manifest (else `edgefleet images sign` later)",
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="the image's version (default: edgefleet's +YYYYMMDD)")
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="where the compiled llama.cpp wheels are kept between builds"),
    ] = None,
) -> None:
    """Build an image from its recipe: root file system, raw disk image or overlay, signed."""
    import os

    from fleet.images.build import build_image

    private_pem = _read_key(key) if key is not None else None
    default_cache = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache/edgefleet"))
    err = Console(stderr=True, highlight=False)

    def show(line: str) -> None:
        err.print(line, markup=False, soft_wrap=True)

    try:
        built = build_image(
            recipe, out, repo=_repo(), cache=cache or default_cache, version=version,
            private_key=private_pem, console=show,
        )  # fmt: skip
    except (ImageRejected, ConfigError) as exc:
        fail(str(exc), code=2)
    except ImageBuildFailed as exc:
        fail(f"{exc}\nrun it again once the cause is fixed (a mirror or network error "
             "often passes)", code=3)  # fmt: skip
    minutes, seconds = divmod(round(built.seconds), 60)
    typer.echo(
        f"built {built.manifest.recipe} {built.manifest.version} in {minutes} min {seconds} s"
    )
    for name, artifact in sorted(built.manifest.artifacts.items()):
        typer.echo(f"  {name:32} {size(artifact.size):>10}  sha256 {artifact.sha256}")
    if not built.signed:
        typer.echo(f"unsigned: sign it with `edgefleet images sign {out} --key image-key.pem`")


@app.command("keygen")
def keygen(
    out: Annotated[
        Path, typer.Option("--out", file_okay=False, help="the folder to write the key pair to")
    ],
) -> None:
    """Create the image key: image-key.pem (private, 0600) and image-key.pub (public)."""
    from fleet.images.keys import generate_image_key, keyid_of

    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            fail(f"{path} exists; refusing to overwrite an image key")
    private_pem, public_pem = generate_image_key()
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(private_path, private_pem, mode=PRIVATE_FILE, exclusive=True)
        atomic_write(public_path, public_pem, mode=PUBLIC_FILE, exclusive=True)
    except FileExistsError as exc:
        fail(f"{exc.filename or exc} exists; refusing to overwrite an image key")
    except OSError as exc:
        fail(f"cannot write the image key to {out}: {exc}")
    typer.echo(f"image key {keyid_of(public_pem)}")
    typer.echo(f"  private: {private_path} (sign with it, keep it off the build server)")
    typer.echo(f"  public:  {public_path} (give it to whoever flashes devices)")


@app.command("sign")
def sign(
    image: ImageArg,
    key: Annotated[
        Path,
        typer.Option("--key", exists=True, dir_okay=False, help="the image private key (PEM)"),
    ],
    check: Annotated[
        bool,
        typer.Option(help="check the artifacts and files against the manifest before signing"),
    ] = True,
) -> None:
    """Sign an image's manifest.json with the image key (after checking what it describes)."""
    from fleet.images.folder import check_image, image_folder, write_signature
    from fleet.images.keys import signature_keyid
    from fleet.images.manifest import parse_manifest

    folder = image_folder(image)
    private_pem = _read_key(key)
    with _image_errors():
        raw = _read_manifest(folder)
        manifest = parse_manifest(raw)
        if check:
            with _meter() as meter:
                artifacts, files = check_image(folder, manifest, meter=meter)
            if artifacts or files:
                _report_mismatches(manifest, artifacts, files, "not signed")
        signature = write_signature(folder, raw, private_pem)
    typer.echo(f"signed {manifest.recipe} {manifest.version}: {signature_keyid(signature)}")


def _report_mismatches(
    manifest: ImageManifest,
    artifacts: Sequence[Mismatch],
    files: Sequence[Mismatch],
    verdict: str,
) -> NoReturn:
    """Name every mismatch (the first :data:`SHOWN`, then a count) and exit with status 2."""
    found = [*artifacts, *files]
    typer.secho(
        f"{verdict}: {len(files)} of {len(manifest.files)} files and {len(artifacts)} of "
        f"{len(manifest.artifacts)} artifacts differ from the manifest",
        fg=typer.colors.RED,
        err=True,
    )
    for mismatch in found[:SHOWN]:
        typer.echo(f"  {mismatch}", err=True)
    if len(found) > SHOWN:
        typer.echo(f"  ... and {len(found) - SHOWN} more", err=True)
    raise typer.Exit(2)


@app.command("verify")
def verify(
    image: ImageArg,
    key: Annotated[
        Path,
        typer.Option("--key", exists=True, dir_okay=False, help="the image public key (PEM)"),
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="compare this root filesystem (mounted or unpacked) instead of the tarball",
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(help="with --root, also skip this path (relative to the root; repeat)"),
    ] = None,
) -> None:
    """Check the signature, then every artifact, then every file of a built image."""
    from fleet.images.folder import OVERLAY_SUFFIX, RUNTIME_PATHS, image_folder, verify_image

    if ignore and root is None:
        raise typer.BadParameter("needs --root: a tarball is compared whole", param_hint="--ignore")
    skipped = (*RUNTIME_PATHS, *(p.strip("/") for p in ignore or ())) if root else ()
    public_pem = _read_key(key)
    with _image_errors(), _meter() as meter:
        result = verify_image(
            image_folder(image), public_pem, root=root, ignore=skipped, meter=meter
        )
    manifest = result.manifest
    if skipped:
        typer.echo(f"not compared (written after the build): {', '.join(skipped)}")
    if root is not None and manifest.files_from.endswith(OVERLAY_SUFFIX):
        typer.echo("an overlay: files it does not list are not compared")
    if not result.ok:
        _report_mismatches(manifest, result.artifact_mismatches, result.file_mismatches, "FAILED")
    typer.echo(
        f"verified: {len(manifest.files)} files, {len(manifest.artifacts)} artifacts, "
        f"signed by {result.keyid}"
    )


@app.command("show")
def show(
    image: ImageArg,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key", exists=True, dir_okay=False, help="also verify the signature with this key"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON")] = False,
) -> None:
    """What an image is: recipe, version, arch, artifact sizes, package counts, signer."""
    from fleet.images.folder import image_folder
    from fleet.images.keys import check_signature, signature_keyid
    from fleet.images.manifest import SIGNATURE_FILE, parse_manifest

    folder = image_folder(image)
    with _image_errors():
        raw = _read_manifest(folder)
        sig_path = folder / SIGNATURE_FILE
        signature = sig_path.read_bytes() if sig_path.is_file() else None
        if key is not None:
            if signature is None:
                raise ImageRejected(f"no {SIGNATURE_FILE} in {folder}: the manifest is unsigned")
            signer: str | None = check_signature(raw, signature, _read_key(key))
        else:
            signer = signature_keyid(signature) if signature is not None else None
        manifest = parse_manifest(raw)
    summary = _summary(manifest, signer, verified=key is not None)
    if as_json:
        print_json(summary)
        return
    built = datetime.fromtimestamp(manifest.source_date_epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        ("recipe", manifest.recipe),
        ("version", manifest.version),
        ("arch", manifest.arch),
        ("device class", manifest.device_class),
        ("built", f"{built} UTC (SOURCE_DATE_EPOCH), edgefleet {manifest.built_with}"),
        ("files", f"{len(manifest.files)} in {manifest.files_from}"),
        (
            "packages",
            f"{len(manifest.packages.debian)} Debian, {len(manifest.packages.python)} Python",
        ),
    ]
    lines += [
        ("artifact", f"{name}  {size(a.size)}  sha256 {a.sha256}")
        for name, a in sorted(manifest.artifacts.items())
    ]
    if signer is None:
        lines.append(("signed by", "nobody: no manifest.sig"))
    else:
        state = "verified" if key is not None else "not verified: pass --key"
        lines.append(("signed by", f"{signer} ({state})"))
    for label, value in lines:
        typer.echo(f"{label + ':':<14}{value}")


def _summary(manifest: ImageManifest, signer: str | None, *, verified: bool) -> dict[str, Any]:
    return {
        "recipe": manifest.recipe,
        "version": manifest.version,
        "arch": manifest.arch,
        "device_class": manifest.device_class,
        "source_date_epoch": manifest.source_date_epoch,
        "built_with": manifest.built_with,
        "artifacts": {n: a.model_dump() for n, a in sorted(manifest.artifacts.items())},
        "files": len(manifest.files),
        "files_from": manifest.files_from,
        "packages": {
            "debian": len(manifest.packages.debian),
            "python": len(manifest.packages.python),
        },
        "keyid": signer,
        "verified": verified,
    }
