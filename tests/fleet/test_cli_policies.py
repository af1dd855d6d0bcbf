"""``edgefleet policies`` against an in-process controller: create from TOML, assign, show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient

from fleet.cli.policies import read_policy_file
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import cli, enroll, ok
from tests.fleet.helpers import Clock

POLICY_TOML = """\
description = "the lab's degraded mode"

[breaker]
failure_rate_threshold = 50.0
minimum_calls = 5
sliding_window = 20
wait_in_open = 30.0

[chains."gemma3-270m"]
retry_after = 60

[[chains."gemma3-270m".tiers]]
kind = "model"
model = "gemma3-270m-q2"
when = ["out_of_memory"]

[[chains."gemma3-270m".tiers]]
kind = "model"
model = "gemma3-270m"
device = "cpu"

[[chains."gemma3-270m".tiers]]
kind = "rules"
default = "The assistant is busy; try again in a minute."
"""


def lab(http: TestClient, clock: Clock) -> list[str]:
    ok(http, "groups", "create", "lab")
    out = ok(http, "tokens", "create", "--group", "lab", "--uses", "2")
    secret = next(w for w in out.split() if w.startswith("eft_"))
    ids = [enroll(http, clock, secret) for _ in range(2)]
    for device_id, models in zip(
        ids, (["gemma3-270m", "gemma3-270m-q2"], ["gemma3-270m"]), strict=True
    ):
        body = {"models": [{"name": m} for m in models]}
        response = http.put(
            f"/api/v1/devices/{device_id}/desired",
            json=body,
            headers={"Authorization": "Bearer test-admin-token-0123456789abcdef"},
        )
        assert response.status_code == 202, response.text
    return ids


def test_create_assign_show_list_unassign(
    http: TestClient, link: FakeLink, clock: Clock, tmp_path: Path
) -> None:
    able, short = lab(http, clock)
    file = tmp_path / "policy.toml"
    file.write_text(POLICY_TOML)

    created = json.loads(ok(http, "policies", "create", "edge", "--file", str(file), "--json"))
    assert (created["version"], created["description"]) == (1, "the lab's degraded mode")
    out = ok(http, "policies", "create", "edge", "-f", str(file), "--description", "v2")
    assert "created policy edge version 2" in out
    assert "gemma3-270m -> gemma3-270m-q2 [out_of_memory] -> gemma3-270m (cpu)" in out

    out = ok(http, "policies", "assign", "edge", "--version", "1", "--group", "lab")
    assert "assigned edge version 1 (group lab)" in out
    assert f"{able}  updated" in out
    assert f"{short}  ineligible" in out
    assert "names gemma3-270m-q2, which this device does not have" in out
    assert link.published[-1].device_id == able
    assert link.published[-1].fallback == created["body"]

    out = ok(http, "policies", "show", "edge", "--version", "1")
    for words in ("group lab", "pending", "ineligible"):
        assert words in out
    listed = json.loads(ok(http, "policies", "list", "--json"))
    assert [(p["name"], p["version"], p["devices_assigned"]) for p in listed] == [("edge", 2, 2)]
    assert "edge" in ok(http, "policies", "list")

    out = ok(http, "policies", "unassign", "--group", "lab")
    assert "unassigned edge version 1" in out
    assert link.published[-1].fallback == {}


def test_errors_are_one_clear_line(http: TestClient, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"breaker": {"minimum_calls": 50, "sliding_window": 10}}))
    result = cli(http, "policies", "create", "edge", "--file", str(bad))
    assert result.exit_code == 1
    assert "minimum_calls (50) cannot exceed sliding_window (10)" in result.output
    assert "HTTP 422" in result.output
    result = cli(http, "policies", "assign", "edge", "--group", "lab")
    assert result.exit_code == 1
    assert "no policy 'edge'" in result.output
    result = cli(http, "policies", "assign", "edge")
    assert result.exit_code == 2
    assert "exactly one of --group and --device" in result.output


def test_the_policy_file_is_checked_before_sending(tmp_path: Path) -> None:
    for text, suffix, words in (
        ("[breaker", ".toml", "not valid TOML"),
        ("[]", ".json", "must hold a table"),
        ('{"version": 3}', ".json", "leave 'version' out"),
        ('{"name": "other"}', ".json", "names another policy"),
        ('{"tiers": []}', ".json", "unknown keys tiers"),
    ):
        path = tmp_path / f"p{suffix}"
        path.write_text(text)
        with pytest.raises(typer.BadParameter, match=words):
            read_policy_file(path, "edge")
    path = tmp_path / "ok.json"
    path.write_text('{"name": "edge", "chains": {}}')
    assert read_policy_file(path, "edge") == {"chains": {}}
    with pytest.raises(typer.BadParameter, match="cannot read"):
        read_policy_file(tmp_path / "absent.toml", "edge")
