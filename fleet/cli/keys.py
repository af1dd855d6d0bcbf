"""'edgefleet keys': the TUF signing keys.

init, rotate and status work on the controller's data folder directly (they need its
private keys; the repository locks its folder, so a running controller is fine); sign
needs no controller at all (the offline machine); staged and import go through the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fleet.cli.connection import Connection, DataDirOpt, connected
from fleet.cli.output import JsonOpt, console, fail, fleet_errors, print_json, settings_from
from fleet.config import DEFAULT_DATA_DIR
from fleet.files import PUBLIC_FILE, atomic_write

if TYPE_CHECKING:
    from fleet.registry.repository import TufRepository

__all__ = ["app"]

app = typer.Typer(
    no_args_is_help=True,
    help="TUF signing keys: init, rotate, status (on the data folder); sign (anywhere); "
    "staged and import (through the API) for keys kept offline.",
)

KeyFileOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--key",
        exists=True,
        dir_okay=False,
        help="a PKCS#8 PEM private key (repeat for several)",
    ),
]
OfflineDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--offline-dir",
        file_okay=False,
        help="write the new root (and targets) private keys here instead of the data folder",
    ),
]


def _write(target: Path, data: bytes) -> None:
    """Write TUF metadata (public: 0644) durably, or exit with one line saying why not."""
    try:
        atomic_write(target, data, mode=PUBLIC_FILE)
    except OSError as exc:
        fail(f"cannot write {target}: {exc}")


def _repository(data_dir: Path) -> TufRepository:
    from fleet.app import open_repository

    return open_repository(settings_from({"data_dir": data_dir}))


@app.command("init")
def init(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    root_keys: Annotated[int, typer.Option(min=1, help="how many root keys")] = 1,
    root_threshold: Annotated[
        int, typer.Option(min=1, help="root signatures needed for a new root")
    ] = 1,
    targets_keys: Annotated[int, typer.Option(min=1, help="how many targets keys")] = 1,
    targets_threshold: Annotated[
        int, typer.Option(min=1, help="targets signatures needed for new targets")
    ] = 1,
    offline_dir: OfflineDirOpt = None,
    offline_targets: Annotated[
        bool, typer.Option(help="keep the targets keys in --offline-dir too")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="replace an existing repository (devices need the new root)")
    ] = False,
) -> None:
    """Create the TUF repository and a key for every role (before the first 'serve')."""
    from fleet.tables import utc_now

    if offline_targets and offline_dir is None:
        raise typer.BadParameter("needs --offline-dir", param_hint="--offline-targets")
    repo = _repository(data_dir)
    offline = ("root", "targets") if offline_targets else ("root",)
    with fleet_errors():
        result = repo.init(
            utc_now(),
            root_keys=root_keys,
            root_threshold=root_threshold,
            targets_keys=targets_keys,
            targets_threshold=targets_threshold,
            offline_dir=offline_dir,
            offline_roles=offline,
            force=force,
        )
    typer.echo(f"created the TUF repository in {repo.path}")
    for role, keyids in result.keyids.items():
        typer.echo(f"  {role}: {', '.join(k[:16] for k in keyids)}")
    if result.offline_files:
        count = len(result.offline_files)
        typer.echo(f"offline private keys ({count}), move them off this machine:")
        for path in result.offline_files:
            typer.echo(f"  {path}")
    else:
        typer.echo(
            "every key is online: move root offline with "
            "`edgefleet keys rotate root --offline-dir DIR`"
        )


@app.command("rotate")
def rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot, timestamp or director")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    root_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--root-key",
            exists=True,
            dir_okay=False,
            help="an offline root key (PEM) to sign the new root with; repeat for several",
        ),
    ] = None,
    keys: Annotated[
        int | None, typer.Option("--keys", min=1, help="how many new keys (default: as now)")
    ] = None,
    threshold: Annotated[
        int | None, typer.Option(min=1, help="signatures needed (default: as now)")
    ] = None,
    offline_dir: OfflineDirOpt = None,
) -> None:
    """Replace a role's keys through a new root, signed by old and new root keys."""
    from fleet.registry.keys import load_signers
    from fleet.tables import utc_now

    repo = _repository(data_dir)
    with fleet_errors():
        signers = load_signers(root_key or [])
        change = repo.rotate(
            role,
            utc_now(),
            signers=signers,
            keys=keys,
            threshold=threshold,
            offline_dir=offline_dir,
        )
    typer.echo(f"new {role} keys: {', '.join(k[:16] for k in change.keyids)}")
    if offline_dir is not None:
        for path in change.key_files:
            typer.echo(f"  private key: {path} (move it off this machine)")
    if change.published:
        typer.echo(f"published root v{change.version}")
    else:
        typer.echo(
            f"root v{change.version} staged: it still needs signatures ({change.missing}); "
            "`edgefleet keys staged root`, sign it with `edgefleet keys sign`, then "
            "`edgefleet keys import`"
        )


@app.command("sign")
def sign(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="TUF metadata (JSON) to sign")
    ],
    key: KeyFileOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: in place)")
    ] = None,
) -> None:
    """Add signatures to a metadata file: the offline-signing tool, no controller needed."""
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError
    from tuf.api.serialization.json import JSONSerializer

    from fleet.registry.keys import load_signers

    if not key:
        raise typer.BadParameter("give at least one --key", param_hint="--key")
    with fleet_errors():
        signers = load_signers(key)
    try:
        md: Metadata[Any] = Metadata.from_bytes(file.read_bytes())
    except OSError as exc:
        fail(f"cannot read {file}: {exc}")
    except DeserializationError as exc:
        fail(f"{file} is not TUF metadata: {exc.__cause__ or exc}")
    for signer in signers:
        md.sign(signer, append=True)
    target = output or file
    _write(target, md.to_bytes(JSONSerializer(compact=False)))
    ids = ", ".join(s.public_key.keyid[:16] for s in signers)
    typer.echo(
        f"signed {md.signed.type} v{md.signed.version} with {len(signers)} key(s) ({ids}); "
        f"{len(md.signatures)} signature(s) in {target}"
    )


@app.command("status")
def status(data_dir: DataDirOpt = DEFAULT_DATA_DIR, as_json: JsonOpt = False) -> None:
    """Roles, key ids, thresholds, versions and expiries; which keys are on this controller."""
    repo = _repository(data_dir)
    with fleet_errors():
        roles = repo.status()
        staged = {"targets": repo.staged_targets_version(), "root": repo.staged_root_version()}
    if as_json:
        print_json(
            {
                "roles": [
                    {
                        "role": r.role,
                        "version": r.version,
                        "expires": r.expires.isoformat() if r.expires else None,
                        "keyids": list(r.keyids),
                        "threshold": r.threshold,
                        "online": list(r.online),
                    }
                    for r in roles
                ],
                "staged": staged,
            }
        )
        return
    table = Table("role", "version", "expires", "threshold", "keys (online marked *)", box=None)
    for r in roles:
        keys = " ".join(f"{k[:12]}{'*' if k in r.online else ''}" for k in r.keyids)
        expires = r.expires.strftime("%Y-%m-%d %H:%M") if r.expires else "- (in root)"
        shown = "-" if r.version is None else str(r.version)
        table.add_row(r.role, shown, expires, f"{r.threshold} of {len(r.keyids)}", keys)
    console().print(table)
    for role, version in staged.items():
        if version is not None:
            typer.echo(f"staged {role} v{version}: waiting for offline signatures")


@app.command("staged")
@connected
def staged(
    connection: Connection,
    role: Annotated[str, typer.Argument(help="targets or root")] = "targets",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: ROLE.json)")
    ] = None,
) -> None:
    """Download the next targets (or a staged root), unsigned, to sign offline."""
    if role not in {"targets", "root"}:
        raise typer.BadParameter("targets or root", param_hint="ROLE")
    with connection.client() as client:
        body = client.get(f"/api/v1/tuf/staged/{role}.json")
    target = output or Path(f"{role}.json")
    _write(target, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    typer.echo(f"wrote {role} v{body['signed']['version']} to {target}: sign it offline")


@app.command("import")
@connected
def import_metadata(
    connection: Connection,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="signed targets or root JSON")
    ],
) -> None:
    """Publish targets or root metadata signed offline."""
    try:
        data = file.read_bytes()
        role = json.loads(data)["signed"]["_type"]
    except OSError as exc:
        fail(f"cannot read {file}: {exc}")
    except (ValueError, KeyError, TypeError):
        fail(f"{file} is not TUF metadata")
    if role not in {"targets", "root"}:
        fail(f"{file} is {role} metadata: only targets and root are imported")
    with connection.client() as client:
        result = client.request(
            "PUT", f"/api/v1/tuf/{role}", content=data, headers={"Content-Type": "application/json"}
        )
    typer.echo(f"published {result['role']} v{result['version']}")
