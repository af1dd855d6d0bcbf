"""``edgefleet alerts`` against an in-process controller: list, ack, rules, rules set.

The webhook commands are in test_alert_webhook.py, beside the HTTP server they post to.
"""

from __future__ import annotations

import json

import pytest
import typer
from fastapi.testclient import TestClient

from fleet.alerts import RuleKind, evaluate
from fleet.cli.alerts import parse_params
from tests.fakes.fleet_link import FakeLink
from tests.fleet.cli_support import cli, enroll, ok
from tests.fleet.helpers import Clock
from tests.fleet.test_alerts import DEFAULTS


def test_parse_params_reads_json_values_and_keeps_the_rest_as_text() -> None:
    assert parse_params(["minutes=30", "gate_failures=false", "share=0.5", "x=soon"]) == {
        "minutes": 30,
        "gate_failures": False,
        "share": 0.5,
        "x": "soon",
    }
    with pytest.raises(typer.BadParameter, match="'minutes' is not KEY=VALUE"):
        parse_params(["minutes"])
    with pytest.raises(typer.BadParameter):
        parse_params(["=3"])


def test_rules_are_listed_tuned_disabled_and_reset(http: TestClient) -> None:
    table = ok(http, "alerts", "rules")
    for text in (
        "device_offline",
        "minutes=15.0",
        "group_degraded",
        "share=0.2",
        "rollout_failed (event)",
        "timestamp_days=0.25",
        "spool_dropped",
    ):
        assert text in table, table
    assert "*" not in table.split("\n", 1)[1]  # nothing set by an admin yet

    out = ok(http, "alerts", "rules", "set", "device_offline", "--param", "minutes=30")
    assert "minutes=30.0*" in out
    out = ok(http, "alerts", "rules", "set", "device_offline", "--disable")
    assert "minutes=30.0*" in out  # the parameter set before stays
    rule = next(
        r
        for r in json.loads(ok(http, "alerts", "rules", "--json"))["items"]
        if r["kind"] == "device_offline"
    )
    assert (rule["enabled"], rule["overrides"]) == (False, {"minutes": 30.0})
    assert rule["updated_by"].startswith("admin")

    both = ok(
        http, "alerts", "rules", "set", "tuf_expiry", "-p", "root_days=60", "-p", "snapshot_days=3"
    )
    assert "root_days=60.0*" in both
    assert "snapshot_days=3.0*" in both
    reset = json.loads(
        ok(http, "alerts", "rules", "set", "device_offline", "--reset", "--enable", "--json")
    )
    assert (reset["enabled"], reset["overrides"], reset["params"]) == (True, {}, {"minutes": 15.0})


def test_rules_set_refuses_what_the_controller_refuses(http: TestClient) -> None:
    unknown = cli(http, "alerts", "rules", "set", "disk_full", "--enable")
    assert unknown.exit_code == 1
    assert "no alert rule 'disk_full' (the rules: device_offline" in unknown.output
    bad = cli(http, "alerts", "rules", "set", "device_offline", "--param", "minutes=-5")
    assert bad.exit_code == 1
    assert "invalid params.minutes" in bad.output
    other = cli(http, "alerts", "rules", "set", "device_offline", "--param", "share=0.5")
    assert other.exit_code == 1
    assert "invalid params.share: not a parameter of this rule" in other.output
    usage = cli(http, "alerts", "rules", "set", "device_offline", "--param", "minutes")
    assert usage.exit_code == 2
    assert "KEY=VALUE" in usage.output


def test_alerts_are_listed_and_acknowledged(http: TestClient, link: FakeLink, clock: Clock) -> None:
    engine = link.engine
    assert engine is not None
    ok(http, "groups", "create", "lab")
    out = ok(http, "tokens", "create", "--group", "lab")
    device = enroll(http, clock, next(w for w in out.split() if w.startswith("eft_")))
    clock.advance(minutes=20)  # enrolled, never seen since
    evaluate(engine, DEFAULTS, now=clock.now, kinds=[RuleKind.DEVICE_OFFLINE])

    listed = ok(http, "alerts", "list", "--kind", "device_offline")
    for text in ("warning", "device_offline", f"device:{device}", "offline since"):
        assert text in listed, listed
    (alert,) = json.loads(ok(http, "alerts", "list", "--json"))["items"]
    assert ok(http, "alerts", "list", "--kind", "group_degraded") == "no open alerts\n"

    acked = ok(http, "alerts", "ack", str(alert["id"]))
    assert f"acknowledged alert {alert['id']} (device_offline device:{device}) as admin" in acked
    assert "stays open while its condition holds" in acked
    (shown,) = json.loads(ok(http, "alerts", "list", "--json"))["items"]
    assert shown["acknowledged_by"].startswith("admin")
    assert shown["acknowledged_by"] in ok(http, "alerts", "list")

    missing = cli(http, "alerts", "ack", "424242")
    assert missing.exit_code == 1
    assert "no alert 424242" in missing.output
