"""``edgefleet tokens create --count N [--out FILE]``: a batch of tokens as a CSV file.

Against an in-process controller (SQLite, fake link), through the CLI's real code path.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.fleet.cli_support import cli, enroll, ok
from tests.fleet.helpers import Clock

HEADER = ["index", "token_id", "secret", "group", "expires_at"]


def rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == HEADER
    return list(reader)


def listed(http: TestClient) -> list[dict[str, object]]:
    tokens: list[dict[str, object]] = json.loads(ok(http, "tokens", "list", "--json"))
    return tokens


@pytest.mark.usefixtures("permissive_umask")
def test_a_batch_goes_into_a_private_csv_file(
    http: TestClient, tmp_path: Path, clock: Clock
) -> None:
    ok(http, "groups", "create", "line-4")
    out = tmp_path / "tokens.csv"

    result = cli(http, "tokens", "create", "--count", "5", "--group", "line-4",
                 "--expires", "7d", "--out", str(out))  # fmt: skip

    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the secrets went into the file only
    assert "created 5 tokens (group line-4, 1 use each, expire 2031-05-13 07:08:09)" in (
        result.stderr
    )
    assert f"--tokens {out} --index N" in result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    found = rows(out.read_text())
    assert [r["index"] for r in found] == ["1", "2", "3", "4", "5"]
    assert {r["group"] for r in found} == {"line-4"}
    assert all(r["expires_at"].startswith("2031-05-13T07:08:09") for r in found)
    assert all(r["secret"].startswith("eft_") for r in found)
    assert {r["token_id"] for r in found} == {t["id"] for t in listed(http)}
    enroll(http, clock, found[2]["secret"])  # the file's secrets enroll devices
    states = {t["id"]: t["state"] for t in listed(http)}
    assert states[found[2]["token_id"]] == "used"


def test_an_existing_file_is_kept_unless_forced(http: TestClient, tmp_path: Path) -> None:
    out = tmp_path / "tokens.csv"
    out.write_text("secrets handed to the flashing station\n")

    refused = cli(http, "tokens", "create", "--count", "3", "--out", str(out))

    assert refused.exit_code == 2
    assert "exists" in refused.stderr
    assert "--force" in refused.stderr
    assert out.read_text() == "secrets handed to the flashing station\n"
    assert listed(http) == []  # refused before any token was made

    forced = cli(http, "tokens", "create", "--count", "3", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert len(rows(out.read_text())) == 3
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_missing_folder_is_refused_before_any_token(http: TestClient, tmp_path: Path) -> None:
    result = cli(http, "tokens", "create", "--count", "2", "--out", str(tmp_path / "no" / "t.csv"))
    assert result.exit_code == 2
    assert "no folder" in result.stderr
    assert listed(http) == []


def test_without_out_the_csv_goes_to_stdout(http: TestClient) -> None:
    result = cli(http, "tokens", "create", "--count", "4", "--uses", "2", "--expires", "never")
    assert result.exit_code == 0, result.output
    found = rows(result.stdout)
    assert len(found) == 4
    assert {(r["group"], r["expires_at"]) for r in found} == {("", "")}
    assert "created 4 tokens (group -, 2 uses each, expire never)" in result.stderr
    assert {t["uses_left"] for t in listed(http)} == {2}


def test_one_token_into_a_file(http: TestClient, tmp_path: Path) -> None:
    out = tmp_path / "one.csv"
    ok(http, "tokens", "create", "--out", str(out))
    (only,) = rows(out.read_text())
    assert only["index"] == "1"


def test_a_batch_as_json(http: TestClient) -> None:
    batch = json.loads(cli(http, "tokens", "create", "--count", "2", "--json").stdout)
    assert batch["fleet_url"] == "https://fleet.example.com"
    assert len(batch["tokens"]) == 2


@pytest.mark.parametrize("count", ["0", "10001"])
def test_count_is_bounded(http: TestClient, count: str) -> None:
    result = cli(http, "tokens", "create", "--count", count)
    assert result.exit_code == 2
    assert "--count" in result.output
