"""``edgefleet rollouts`` against an in-process controller: create, follow, act, refuse."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlmodel import Session

from fleet.tables import ModelArtifact, PolicyRow
from models.policy import FallbackPolicy, policy_digest
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import cli, enroll, ok
from tests.fleet.helpers import START, Clock
from tests.fleet.rollout_world import GB, sha


def fleet(http: TestClient, link: FakeLink, clock: Clock) -> list[str]:
    ok(http, "groups", "create", "lab")
    out = ok(http, "tokens", "create", "--group", "lab", "--uses", "3")
    secret = next(w for w in out.split() if w.startswith("eft_"))
    ids = [enroll(http, clock, secret) for _ in range(3)]
    assert link.engine is not None
    with Session(link.engine) as session:
        for version, variant, ram in (("1.0", "Q4_K_M", GB), ("2.0", "Q4_K_M", GB),
                                      ("2.0", "Q8_0", 4 * GB)):  # fmt: skip
            session.add(
                ModelArtifact(
                    name="gemma3",
                    version=version,
                    variant=variant,
                    format="gguf",
                    sha256=sha(f"{version}/{variant}"),
                    size_bytes=100,
                    meta={"quantization": variant, "ram_bytes": ram},
                )
            )
        session.commit()
    return ids


def test_create_status_devices_and_abort(http: TestClient, link: FakeLink, clock: Clock) -> None:
    ids = fleet(http, link, clock)
    created = ok(
        http, "rollouts", "create", "--model", "gemma3", "--version", "2.0", "--group", "lab",
        "--canary", "1", "--waves", "50,100", "--soak", "600",
        "--gate", "p95_latency_ms:max_increase=20,window=300,min_samples=5",
        "--abort", "health_check_failed:10%,min=2", "--window", "02:00-05:00@Europe/Berlin",
        "--json",
    )  # fmt: skip
    detail = json.loads(created)
    rollout = detail["id"]
    spec = detail["spec"]
    assert spec["canary"] == {"count": 1, "percent": None}
    assert spec["stages"]["percents"] == [50.0, 100.0]
    assert spec["gates"][0]["max_increase_percent"] == 20
    assert spec["abort_rules"][0] == {
        "failure": "health_check_failed",
        "threshold_percent": 10.0,
        "threshold_count": None,
        "min_devices": 2,
    }
    assert spec["maintenance_window"]["timezone"] == "Europe/Berlin"
    shown = ok(http, "rollouts", "status", rollout)
    assert "canary" in shown
    assert "50%" in shown
    listed = ok(http, "rollouts", "devices", rollout)
    assert all(device_id in listed for device_id in ids)
    assert "Q8_0 (cpu)" in listed  # the enrolled devices have 8 GB: Q8_0 fits
    ok(http, "rollouts", "pause", rollout, "--reason", "lunch")
    assert "paused" in ok(http, "rollouts", "list")
    aborted = ok(http, "rollouts", "abort", rollout, "--reason", "wrong build")
    assert "aborted" in aborted
    assert "wrong build" in aborted
    watched = ok(http, "rollouts", "status", rollout, "--watch")  # ends with the rollout
    assert "rolled back" in watched


def test_bad_options_and_refusals_are_one_line(
    http: TestClient, link: FakeLink, clock: Clock
) -> None:
    fleet(http, link, clock)
    bad = cli(http, "rollouts", "create", "--model", "gemma3", "--version", "2.0",
              "--group", "lab", "--canary", "2.5")  # fmt: skip
    assert bad.exit_code == 2
    assert "whole number" in bad.output
    refused = cli(http, "rollouts", "create", "--model", "gemma3", "--version", "2.0",
                  "--group", "lab", "--waves", "10,50")  # fmt: skip
    assert refused.exit_code == 1
    assert "stages.waves.percents" in refused.output
    unknown = cli(http, "rollouts", "status", "ro-nope")
    assert unknown.exit_code == 1
    assert "no rollout" in unknown.output


def store_policy(link: FakeLink, version: int) -> None:
    policy = FallbackPolicy(name="edge-default", version=version)
    assert link.engine is not None
    with Session(link.engine) as session:
        session.add(
            PolicyRow(
                name=policy.name,
                version=version,
                body=policy.model_dump(mode="json"),
                digest=policy_digest(policy),
                created_by="admin",
                created_at=START,
            )
        )
        session.commit()


def test_a_policy_rollout_from_create_to_abort(
    http: TestClient, link: FakeLink, clock: Clock
) -> None:
    fleet(http, link, clock)
    store_policy(link, 1)
    store_policy(link, 2)
    created = ok(
        http, "rollouts", "create", "--policy", "edge-default:2", "--group", "lab",
        "--canary", "1", "--waves", "50,100", "--gate", "fallback_rate:max=0.05,window=300",
        "--json",
    )  # fmt: skip
    detail = json.loads(created)
    assert detail["spec"]["change"] == {"kind": "policy", "policy": "edge-default", "version": 2}
    assert detail["spec"]["gates"][0]["metric"] == "fallback_rate"
    assert detail["spec"]["gates"][0]["max_value"] == 0.05
    rollout = detail["id"]
    assert "policy edge-default v2" in ok(http, "rollouts", "status", rollout)
    assert "policy edge-default v2" in ok(http, "rollouts", "list")
    aborted = ok(http, "rollouts", "abort", rollout, "--reason", "not today")
    assert "aborted" in aborted
    latest = json.loads(
        ok(http, "rollouts", "create", "--policy", "edge-default", "--group", "lab", "--json")
    )
    assert latest["change"] == "policy edge-default v2"  # the latest, fixed


def test_policy_and_model_options_do_not_mix(
    http: TestClient, link: FakeLink, clock: Clock
) -> None:
    fleet(http, link, clock)
    both = cli(http, "rollouts", "create", "--policy", "edge-default", "--model", "gemma3",
               "--group", "lab")  # fmt: skip
    assert both.exit_code == 2
    assert "--policy" in both.output
    unknown = cli(http, "rollouts", "create", "--policy", "nowhere", "--group", "lab")
    assert unknown.exit_code == 1
    assert "change.policy" in unknown.output
