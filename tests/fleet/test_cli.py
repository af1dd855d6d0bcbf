"""The ``edgefleet`` CLI against an in-process controller (SQLite, fake link).

The CLI's HTTP client is handed the app's TestClient through ``obj={"http": ...}``,
so every command runs its real code path down to the routes and the database.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.core import TyperGroup

from fleet.cli import app
from fleet.tables import EventRow
from scripts.servers import free_port
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import EDGEFLEET, cli, enroll, ok, runner
from tests.fleet.helpers import ADMIN_TOKEN, Clock


def test_tokens_create_prints_the_secret_and_the_agent_command(http: TestClient) -> None:
    ok(http, "groups", "create", "lab", "--description", "bench")
    out = ok(http, "tokens", "create", "--group", "lab", "--uses", "3", "--expires", "7d")
    secret = next(w for w in out.split() if w.startswith("eft_"))
    assert "group lab, 3 uses, expires 2031-05-13 07:08:09" in out
    assert f"edgefleet-agent serve --fleet https://fleet.example.com --token {secret}" in out
    listed = ok(http, "tokens", "list")
    assert "active" in listed
    assert "0/3" not in listed
    assert "3/3" in listed
    assert secret not in listed


def test_tokens_json_list_and_revoke(http: TestClient) -> None:
    token = json.loads(ok(http, "tokens", "create", "--expires", "never", "--json"))
    assert token["expires_at"] is None
    assert f"revoked {token['id']}" in ok(http, "tokens", "revoke", token["id"])
    (listed,) = json.loads(ok(http, "tokens", "list", "--json"))
    assert listed["state"] == "revoked"


def test_bad_expires_is_a_usage_error(http: TestClient) -> None:
    result = cli(http, "tokens", "create", "--expires", "soon")
    assert result.exit_code == 2
    assert "--expires" in result.output
    assert "duration" in result.output


def test_devices_list_show_tag_move_desired_revoke(
    http: TestClient, clock: Clock, link: FakeLink
) -> None:
    ok(http, "groups", "create", "lab")
    secret = json.loads(ok(http, "tokens", "create", "--uses", "2", "--json"))["secret"]
    first, second = enroll(http, clock, secret), enroll(http, clock, secret)

    assert first in ok(http, "devices", "list")
    assert second in ok(http, "devices", "list")
    assert f"{first}: tags gpu, rack-1" in ok(http, "devices", "tag", first, "gpu", "rack-1")
    assert f"{first}: tags rack-1" in ok(http, "devices", "tag", first, "gpu", "--remove")
    assert f"{second}: group lab" in ok(http, "devices", "move", second, "lab")
    only_lab = json.loads(ok(http, "devices", "list", "--group", "lab", "--json"))
    assert [d["id"] for d in only_lab["items"]] == [second]
    tagged = json.loads(ok(http, "devices", "list", "--tag", "rack-1", "--json"))
    assert [d["id"] for d in tagged["items"]] == [first]

    out = ok(http, "devices", "desired", first, "--model", "gemma3-270m@1.0.0", "-m", "minilm")
    assert f"{first}: desired version 1 published" in out
    (state,) = link.published
    assert [(m.name, m.version) for m in state.models] == [
        ("gemma3-270m", "1.0.0"),
        ("minilm", None),
    ]

    shown = ok(http, "devices", "show", first)
    assert "desired models: gemma3-270m@1.0.0, minilm" in shown
    assert "no_report" in shown
    assert "aarch64" in shown

    link.broker_down = True
    out = ok(http, "groups", "desired", "lab", "--clear")
    assert f"{second}: desired version 1 stored; publishes when the broker is back" in out
    link.broker_down = False

    assert f"revoked {first}" in ok(http, "devices", "revoke", first, "--yes")
    assert link.cleared == [first]
    revoked = json.loads(ok(http, "devices", "list", "--status", "revoked", "--json"))
    assert [d["id"] for d in revoked["items"]] == [first]


def test_devices_events_oldest_first_and_by_kind(
    http: TestClient, clock: Clock, link: FakeLink
) -> None:
    secret = json.loads(ok(http, "tokens", "create", "--json"))["secret"]
    device_id = enroll(http, clock, secret)
    assert link.engine is not None
    with Session(link.engine) as session:
        for minutes, kind, severity in [
            (20, "update_progress", "info"),
            (10, "update_rolled_back", "warning"),
        ]:
            ts = clock.now - timedelta(minutes=minutes)
            session.add(
                EventRow(
                    device_id=device_id,
                    event_id=f"ev-{minutes}",
                    ts=ts,
                    kind=kind,
                    severity=severity,
                    message=f"{kind} {minutes} minutes ago",
                    stored_at=ts,
                )
            )
        session.commit()
    since = (clock.now - timedelta(hours=1)).isoformat()
    lines = ok(http, "devices", "events", device_id, "--since", since).splitlines()
    assert [line.split()[1:] for line in lines] == [
        ["info", "update_progress", "20", "minutes", "ago"],
        ["warning", "update_rolled_back", "10", "minutes", "ago"],
    ]
    only = ok(
        http,
        "devices",
        "events",
        device_id,
        "--since",
        since,
        "--kind",
        "update_rolled_back",
        "--json",
    )
    assert [json.loads(line)["id"] for line in only.splitlines()] == ["ev-10"]


def test_devices_revoke_asks_first(http: TestClient, clock: Clock, link: FakeLink) -> None:
    secret = json.loads(ok(http, "tokens", "create", "--json"))["secret"]
    device_id = enroll(http, clock, secret)
    result = runner.invoke(
        EDGEFLEET,
        ["devices", "revoke", device_id, "--admin-token", ADMIN_TOKEN],
        obj={"http": http},
        input="n\n",
    )
    assert result.exit_code == 1
    assert "Aborted" in result.output
    assert link.cleared == []


def test_desired_needs_a_model_or_clear(http: TestClient) -> None:
    result = cli(http, "devices", "desired", "dev-0000000000000000")
    assert result.exit_code == 2
    assert "--model" in result.output


def test_groups_list_and_delete(http: TestClient) -> None:
    ok(http, "groups", "create", "lab")
    assert "lab" in ok(http, "groups", "list")
    assert "deleted group lab" in ok(http, "groups", "delete", "lab")
    assert json.loads(ok(http, "groups", "list", "--json")) == []


def test_api_errors_are_one_line_with_status_1(http: TestClient) -> None:
    result = cli(http, "devices", "show", "dev-0000000000000000")
    assert result.exit_code == 1
    assert result.output.strip() == "error: no device 'dev-0000000000000000' (HTTP 404)"
    conflict = cli(http, "groups", "create", "lab"), cli(http, "groups", "create", "lab")
    assert conflict[1].exit_code == 1
    assert "already exists" in conflict[1].output


def test_wrong_or_missing_admin_token_says_how_to_pass_it(http: TestClient, tmp_path: Path) -> None:
    wrong = cli(http, "devices", "list", token="not-the-token")
    assert wrong.exit_code == 1
    assert "rejected the admin token" in wrong.output
    assert "--admin-token" in wrong.output
    missing = runner.invoke(
        EDGEFLEET,
        ["devices", "list", "--data-dir", str(tmp_path / "nowhere")],
        obj={"http": http},
        env={"EDGEFLEET_ADMIN_TOKEN": "", "EDGEFLEET_FLEET_ADMIN_TOKEN": ""},
    )
    assert missing.exit_code == 1
    assert "no admin token was found" in missing.output


def test_admin_token_is_read_from_the_data_dir(http: TestClient, tmp_path: Path) -> None:
    data = tmp_path / "controller"
    data.mkdir()
    (data / "admin-token").write_text(ADMIN_TOKEN + "\n")
    result = runner.invoke(
        EDGEFLEET,
        ["groups", "list", "--data-dir", str(data)],
        obj={"http": http},
        env={"EDGEFLEET_ADMIN_TOKEN": "", "EDGEFLEET_FLEET_ADMIN_TOKEN": ""},
    )
    assert result.exit_code == 0, result.output


def test_admin_token_from_the_environment(http: TestClient) -> None:
    result = runner.invoke(
        EDGEFLEET,
        ["groups", "list"],
        obj={"http": http},
        env={"EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert result.exit_code == 0, result.output


def test_unreachable_controller(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(EDGEFLEET, ["devices", "list", "--url", url, "--admin-token", "x"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: cannot reach the controller at {url}: is `edgefleet serve` running?"
    )
    via_env = runner.invoke(EDGEFLEET, ["groups", "list"], env={"EDGEFLEET_URL": url})
    assert via_env.exit_code == 1
    assert url in via_env.output


def test_status(http: TestClient) -> None:
    out = ok(http, "status")
    assert "broker: mqtt://fake-broker:1883 (external, connected)" in out
    assert "devices: 0 (0 online, 0 offline, 0 revoked)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "invalid setting port"),
        (["--public-url", "ftp://x"], "invalid setting public_url"),
        (["--broker", "nonsense"], "invalid setting broker_url"),
        (["--db", "mysql://u@h/db"], "unsupported database 'mysql'"),
        (["--telemetry-interval", "0"], "invalid setting telemetry_interval_s"),
        (["--log-level", "chatty"], "--log-level"),
    ],
)
def test_serve_refuses_bad_settings_with_status_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(EDGEFLEET, ["serve", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_serve_reports_startup_failures_in_one_line(tmp_path: Path) -> None:
    down = runner.invoke(
        EDGEFLEET,
        ["serve", "--data-dir", str(tmp_path), "--db", "postgresql://x@127.0.0.1:1/none"],
    )
    assert down.exit_code == 1
    assert down.output.startswith("error: the database does not answer")
    no_ca = runner.invoke(
        EDGEFLEET,
        ["serve", "--data-dir", str(tmp_path), "--broker-ca-file", str(tmp_path / "ca.pem")],
    )
    assert no_ca.exit_code == 2
    assert "broker_ca_file" in no_ca.output
    assert "does not exist" in no_ca.output


def test_serve_help_lists_the_important_settings() -> None:
    out = runner.invoke(EDGEFLEET, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in [
        "--data-dir",
        "--db",
        "--host",
        "--port",
        "--public-url",
        "--broker",
        "--broker-port",
        "--broker-public-url",
        "--broker-ca-file",
    ]:
        assert flag in out, flag


def test_simulate_is_loaded_lazily_and_gets_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def simulate(
        devices: Annotated[int, typer.Option(help="how many")] = 1,
        fleet: Annotated[str, typer.Option()] = "",
    ) -> None:
        seen.update(devices=devices, fleet=fleet)
        typer.echo("simulating")

    package = types.ModuleType("fleet.simulate")
    module = types.ModuleType("fleet.simulate.cli")
    module.simulate = simulate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fleet.simulate", package)
    monkeypatch.setitem(sys.modules, "fleet.simulate.cli", module)

    result = runner.invoke(EDGEFLEET, ["simulate", "--devices", "5", "--fleet", "http://x:1"])
    assert result.exit_code == 0, result.output
    assert seen == {"devices": 5, "fleet": "http://x:1"}
    assert "simulating" in result.output
    helped = runner.invoke(EDGEFLEET, ["simulate", "--help"])
    assert helped.exit_code == 0
    assert "--devices" in helped.output
    wrong = runner.invoke(EDGEFLEET, ["simulate", "--devices", "many"])
    assert wrong.exit_code == 2
    assert "--devices" in wrong.output


def test_simulate_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fleet.simulate.cli", None)
    result = runner.invoke(EDGEFLEET, ["simulate", "--devices", "5"])
    assert result.exit_code == 2
    assert "the fleet simulator is not available" in result.output


def _command_paths(group: TyperGroup, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            yield from _command_paths(command, (*prefix, name))
        elif name != "simulate":  # its --help is the simulator's own (tested above)
            yield (*prefix, name)


def test_every_help_renders_as_plain_text() -> None:
    """Typer shows docstrings verbatim: no reStructuredText markup may reach a user."""
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    paths = list(_command_paths(root))
    assert len(paths) > 30
    for path in paths:
        result = runner.invoke(EDGEFLEET, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output, path
        for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
            assert markup not in result.output, (path, markup)


def test_models_push_states_variant_requirements(http: TestClient, tmp_path: Path) -> None:
    model = tmp_path / "tiny.F16.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    metadata = tmp_path / "metadata.json"
    metadata.write_text(
        json.dumps(
            {
                "ram_bytes": 3_000_000_000,
                "vram_bytes": 2_600_000_000,
                "requirements": {"min_l4t": "35.0", "runtimes": {"onnxruntime": "1.0"}},
            }
        )
    )
    push = ["models", "push", str(model), "--name", "tiny", "--version", "1.0"]
    ok(
        http,
        *push,
        "--variant", "F16", "--metadata", str(metadata),
        "--arch", "arm64", "--arch", "x86_64", "--gpu", "required",
        "--min-compute-capability", "8.7", "--min-l4t", "36.0",
        "--requires-runtime", "llama.cpp=0.3.0", "--quality", "910",
    )  # fmt: skip
    [shown] = http.get(
        "/api/v1/models/tiny", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()
    meta = shown["artifacts"][0]["metadata"]
    assert (meta["quantization"], meta["quality"], meta["ram_bytes"]) == ("F16", 910, 3_000_000_000)
    assert meta["requirements"] == {
        "arch": ["aarch64", "x86_64"],
        "gpu": "required",
        "min_compute_capability": "8.7",
        "min_l4t": "36.0",  # the option replaces the file's
        "runtimes": {"llama_cpp": "0.3.0", "onnxruntime": "1.0"},  # and adds to its runtimes
    }
    ok(http, *push, "--variant", "Q4_K_M")
    [version] = http.get(
        "/api/v1/models/tiny", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()
    plain = next(a for a in version["artifacts"] if a["variant"] == "Q4_K_M")["metadata"]
    assert plain["requirements"] == {
        "arch": [],
        "gpu": "preferred",
        "min_compute_capability": None,
        "min_l4t": None,
        "runtimes": {},
    }
    assert plain["quality"] is None


@pytest.mark.parametrize(
    ("args", "option", "message"),
    [
        (["--gpu", "maybe"], "--gpu", "'required', 'preferred' or 'none'"),
        (["--min-compute-capability", "8"], "--min-compute-capability", "MAJOR.MINOR"),
        (["--min-l4t", "r36"], "--min-l4t", "numbers and dots"),
        (["--requires-runtime", "llama.cpp"], "--requires-runtime", "NAME=VERSION"),
        (["--requires-runtime", "llama.cpp=latest"], "--requires-runtime", "minimum version"),
        (["--arch", "x86 64"], "--arch", "not an architecture"),
        (["--gpu", "none", "--min-compute-capability", "8.0"], "--gpu", "gpu 'required'"),
        (["--quality", "1001"], "--quality", "1000"),
    ],
)
def test_models_push_refuses_bad_requirements_before_uploading(
    http: TestClient, tmp_path: Path, args: list[str], option: str, message: str
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(16))
    result = cli(http, "models", "push", str(model), "--name", "t", "--version", "1", *args)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert message in " ".join(result.output.split())
    listed = http.get("/api/v1/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert listed.json() == []
