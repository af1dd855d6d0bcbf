"""The rollout pages: the listing, the create form, the live view and its actions.

In-process against the real app (SQLite and PostgreSQL), signed in through the real
sign-in form. What is checked is what a person sees and what the server does: the
rows shown, the form given back with the error beside its field and nothing created,
a role or CSRF token missing refused with nothing changed, actions audited with who
and from where.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.dashboard.views.rollouts import rollout_progress
from fleet.rollout.views import rollout_detail
from fleet.tables import AuditEntry, GateCheckRow, ModelArtifact, Rollout
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import START, Clock, create_group, enroll
from tests.fleet.rollout_world import GB, World, report, sha

MODEL = "gemma3"


def register(engine: Engine, version: str, variant: str = "Q4_K_M", **meta: Any) -> None:
    with Session(engine) as session:
        session.add(
            ModelArtifact(
                name=MODEL,
                version=version,
                variant=variant,
                format="gguf",
                sha256=sha(f"{version}/{variant}"),
                size_bytes=1000,
                meta={"quantization": variant, **meta},
            )
        )
        session.commit()


@pytest.fixture
def fleet(api: TestClient, clock: Clock, engine: Engine) -> list[str]:
    """Four devices in group "lab"; version 1.0 and 2.0 registered."""
    create_group(api, "lab")
    ids = [enroll(api, clock, group="lab")["device_id"] for _ in range(4)]
    register(engine, "1.0")
    register(engine, "2.0")
    return ids


def form(**fields: str) -> dict[str, str]:
    base = {
        "change": f"model|{MODEL}|2.0",
        "target_groups": "lab",
        "stages_kind": "waves",
        "waves": "100",
        "soak_s": "0",
    }
    return base | fields


def rollouts(engine: Engine) -> list[Rollout]:
    with Session(engine) as session:
        return list(session.exec(select(Rollout)).all())


def start(api: TestClient, **spec: Any) -> str:
    body = {"change": {"model": MODEL, "version": "2.0"}, "target": {"groups": ["lab"]}}
    created = api.post("/api/v1/rollouts", json=body | spec)
    assert created.status_code == 201, created.text
    rollout_id: str = created.json()["id"]
    return rollout_id


def status_of(api: TestClient, rollout_id: str) -> str:
    status: str = api.get(f"/api/v1/rollouts/{rollout_id}").json()["status"]
    return status


# -- the listing --------------------------------------------------------------------------


def test_the_listing_shows_live_rollouts_first_and_new_only_to_operators(
    api: TestClient, fleet: list[str], browser_as: Any
) -> None:
    rollout_id = start(api, name="spring", canary={"count": 1})
    vera: Browser = browser_as("vera")
    page = vera.client.get("/ui/rollouts")
    assert page.status_code == 200, page.text
    live = page.text.split('id="rollouts-live"')[1].split('id="rollouts-history"')[0]
    assert f'href="/ui/rollouts/{rollout_id}"' in live
    assert "spring" in live
    assert "gemma3 2.0" in live
    assert "groups lab" in live
    assert 'data-status="active"' in live
    assert "No rollout has finished yet." in page.text
    assert 'id="new-rollout"' not in page.text
    oscar: Browser = browser_as("oscar")
    assert 'id="new-rollout"' in oscar.client.get("/ui/rollouts").text


def test_the_history_is_paged_newest_first(
    api: TestClient, fleet: list[str], engine: Engine, browser: Browser
) -> None:
    spec = {"change": {"model": MODEL, "version": "2.0"}, "target": {"groups": ["lab"]}}
    with Session(engine) as session:
        for i in range(27):
            at = START - timedelta(hours=i)
            session.add(
                Rollout(
                    id=f"ro-old{i:02d}",
                    name=f"old {i}",
                    change_key=f"model:{MODEL}",
                    spec=spec,
                    status="completed" if i % 2 else "aborted",
                    phase="soaking",
                    stage_started_at=at,
                    created_by="ada",
                    created_at=at,
                    updated_at=at,
                    finished_at=at,
                )
            )
        session.commit()
    first = browser.client.get("/ui/rollouts")
    shown = re.findall(r'data-rollout="(ro-old\d+)"', first.text)
    assert shown == [f"ro-old{i:02d}" for i in range(25)]
    assert "page 1 of 2" in first.text
    second = browser.client.get("/ui/rollouts?page=2")
    assert re.findall(r'data-rollout="(ro-old\d+)"', second.text) == ["ro-old25", "ro-old26"]
    assert browser.client.get("/ui/rollouts?page=0").status_code == 422


def test_signed_out_the_listing_sends_to_sign_in(api: TestClient, users: Any) -> None:
    client = TestClient(api.app)
    answer = client.get("/ui/rollouts", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/ui/login")


# -- creating -----------------------------------------------------------------------------


def test_the_form_offers_the_registry_and_is_for_operators(
    fleet: list[str], browser_as: Any, engine: Engine
) -> None:
    register(engine, "3.0")
    oscar: Browser = browser_as("oscar")
    page = oscar.client.get("/ui/rollouts/new?model=gemma3&version=2.0")
    assert page.status_code == 200, page.text
    assert '<option value="model|gemma3|3.0">gemma3 3.0</option>' in page.text
    assert '<option value="model|gemma3|2.0" selected>' in page.text
    vera: Browser = browser_as("vera")
    assert vera.client.get("/ui/rollouts/new").status_code == 403


def test_start_creates_the_rollout_as_the_api_would_and_shows_it(
    api: TestClient, fleet: list[str], browser_as: Any, engine: Engine
) -> None:
    oscar: Browser = browser_as("oscar")
    fields = form(
        name="from the form",
        canary_kind="count",
        canary_value="1",
        waves="50, 100",
        approval="on",
        **{"gate-0-metric": "error_rate", "gate-0-max_value": "0.05", "gate-0-min_samples": "5"},
        **{"abort-0-failure": "any", "abort-0-threshold_percent": "20"},
    )
    answer = oscar.post_form("/ui/rollouts", fields)
    assert answer.status_code == 303, answer.text
    rollout_id = answer.headers["location"].removeprefix("/ui/rollouts/")
    (row,) = rollouts(engine)
    assert row.id == rollout_id
    assert row.created_by == "oscar"
    spec = row.spec
    assert spec["name"] == "from the form"
    assert spec["canary"] == {"count": 1, "percent": None}
    assert spec["stages"]["percents"] == [50, 100]
    assert spec["approval"] is True
    assert spec["gates"][0]["metric"] == "error_rate"
    assert (spec["gates"][0]["max_value"], spec["gates"][0]["min_samples"]) == (0.05, 5)
    assert spec["abort_rules"] == [
        {"failure": "any", "threshold_percent": 20.0, "threshold_count": None, "min_devices": 1}
    ]
    audit = api.get("/api/v1/audit", params={"subject": f"rollout:{rollout_id}"}).json()
    with Session(engine) as session:
        created = session.exec(
            select(AuditEntry).where(AuditEntry.action == "rollout.created")
        ).one()
    assert (created.actor, created.source.endswith("(session)")) == ("oscar", True)
    assert audit[-1]["action"] == "rollout.created"
    page = oscar.client.get(answer.headers["location"])
    assert page.status_code == 200
    assert 'id="rollout-status"' in page.text


BAD_INPUT: list[tuple[dict[str, str], str, str]] = [
    ({"waves": "10, 50"}, "waves", "100"),
    ({"waves": "50, 10, 100"}, "waves", "grow"),
    ({"target_groups": "nowhere"}, "target_groups", "nowhere"),
    ({"target_groups": "", "facts_arch": "riscv64"}, "target", "no device"),
    ({"target_groups": ""}, "target", "empty"),
    ({"change": ""}, "change", "choose"),
    ({"change": f"model|{MODEL}|7.0"}, "change", "7.0"),
    ({"canary_kind": "count", "canary_value": ""}, "canary", "canary"),
    ({"canary_kind": "percent", "canary_value": "150"}, "canary", "100"),
    ({"gate-0-metric": "error_rate", "gate-0-max_value": "5"}, "gate-0", "fraction"),
    ({"gate-0-metric": "p95_latency_ms"}, "gate-0", "condition"),
    (
        {"gate-1-metric": "p95_latency_ms", "gate-1-max_increase_percent": "-1"},
        "gate-1-max_increase_percent",
        "greater than or equal",
    ),
    ({"abort-0-threshold_percent": "150"}, "abort-0-threshold_percent", "100"),
    ({"window_start": "25:00", "window_end": "04:00"}, "window_start", "pattern"),
    (
        {"window_start": "22:00", "window_end": "04:00", "window_timezone": "Mars/Base"},
        "window_timezone",
        "Mars",
    ),
    ({"facts_min_ram_gib": "lots"}, "facts_min_ram_gib", "lots"),
    ({"soak_s": "-5"}, "soak_s", "greater than or equal"),
    ({"max_concurrent": "many"}, "max_concurrent", "integer"),
    (
        {"stages_kind": "exponential", "exp_start": "5", "exp_factor": "0.5", "exp_max": "10"},
        "exp_factor",
        "greater than 1",
    ),
]


def test_bad_input_gives_the_form_back_with_the_error_beside_the_field(
    fleet: list[str], browser: Browser, engine: Engine
) -> None:
    for fields, field, words in BAD_INPUT:
        answer = browser.post_form("/ui/rollouts", form(**fields))
        assert answer.status_code == 422, (fields, answer.text)
        text = answer.text
        found = re.search(rf'<small class="error field-error" id="err-{field}"[^>]*>([^<]*)<', text)
        assert found is not None, (fields, re.findall(r'id="err-[^"]+"[^>]*>[^<]*', text))
        assert words in found.group(1).replace("&#39;", "'"), (fields, found.group(1))
        assert f'aria-describedby="err-{field}"' in text, fields
        assert 'id="form-errors"' in text
        for name, value in fields.items():  # what was typed is kept
            if value and name not in ("change", "canary_kind", "stages_kind"):
                assert f'value="{value}"' in text, (name, value)
        assert rollouts(engine) == [], fields


def test_a_rival_rollout_gives_the_form_back_with_a_409(
    api: TestClient, fleet: list[str], browser: Browser, engine: Engine
) -> None:
    first = start(api)
    answer = browser.post_form("/ui/rollouts", form())
    assert answer.status_code == 409
    assert first in answer.text
    assert 'id="form-errors"' in answer.text
    assert [r.id for r in rollouts(engine)] == [first]


def test_a_viewer_cannot_start_or_preview_a_rollout(
    fleet: list[str], browser_as: Any, engine: Engine
) -> None:
    vera: Browser = browser_as("vera")
    assert vera.post_form("/ui/rollouts", form()).status_code == 403
    assert vera.post_form("/ui/rollouts/preview", form()).status_code == 403
    assert rollouts(engine) == []


def test_start_without_the_csrf_token_is_refused(
    fleet: list[str], browser: Browser, engine: Engine
) -> None:
    answer = browser.client.post("/ui/rollouts", data=form(), follow_redirects=False)
    assert answer.status_code == 403
    assert rollouts(engine) == []


# -- the live view and actions ------------------------------------------------------------


def stage_counts(text: str, stage: int) -> dict[str, int]:
    row = re.search(rf'<tr data-stage="{stage}"[^>]*>(.*?)</tr>', text, re.S)
    assert row is not None, text
    return {s: int(n) for s, n in re.findall(r'data-state="(\w+)"[^>]*>(\d+)<', row.group(1))}


def test_the_live_view_shows_each_stage_and_refreshes_on_its_topic(
    api: TestClient, fleet: list[str], browser_as: Any
) -> None:
    rollout_id = start(api, canary={"count": 1}, stages={"percents": [50, 100]}, approval=True)
    vera: Browser = browser_as("vera")
    page = vera.client.get(f"/ui/rollouts/{rollout_id}")
    assert page.status_code == 200, page.text
    assert f'sse-connect="/ui/events?topics=rollout-{rollout_id}"' in page.text
    assert f'hx-trigger="sse:rollout-{rollout_id} throttle:1s"' in page.text
    assert re.search(r'id="rollout-status" data-status="active"', page.text)
    fragment = vera.client.get(f"/ui/rollouts/{rollout_id}/progress")
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<div id="rollout-progress"')
    detail = api.get(f"/api/v1/rollouts/{rollout_id}").json()
    for stage in detail["stage_progress"]:
        before = detail["stage_progress"][stage["index"] - 1]["quota"] if stage["index"] else 0
        shown = stage_counts(fragment.text, stage["index"])
        assert sum(shown.values()) == stage["quota"] - before  # every device counted once
        for state, count in stage["devices"].items():
            assert shown[state] >= count
    assert "rollout.created" in fragment.text  # the audit trail
    assert 'data-action="pause"' not in fragment.text  # vera is a viewer
    assert vera.client.get("/ui/rollouts/ro-nothing").status_code == 404


def test_gate_evidence_is_shown_beside_its_stage(
    api: TestClient, fleet: list[str], browser: Browser, engine: Engine
) -> None:
    rollout_id = start(
        api, canary={"count": 1}, gates=[{"metric": "p95_latency_ms", "max_increase_percent": 10}]
    )
    evidence = {
        "metric": "p95_latency_ms",
        "window_s": 300,
        "min_samples": 3,
        "updated": {"value": 130.0, "samples": 12, "devices": 1},
        "baseline": {"value": 100.0, "samples": 11},
        "control": {"value": 30245.4, "samples": 30, "devices": 3},
        "thresholds": {"max_increase_percent": 10, "max_decrease_percent": None,
                       "max_value": None, "min_value": None},
        "change_percent": {"baseline": 30.0, "control": -99.57},
        "verdict": "fail",
    }  # fmt: skip
    with Session(engine) as session:
        session.add(
            GateCheckRow(
                rollout_id=rollout_id,
                stage=0,
                gate=0,
                at=START,
                verdict="fail",
                decision="wait",
                reasons=["p95_latency_ms 130 is +30.0% against the baseline 100"],
                evidence=evidence,
            )
        )
        session.commit()
    text = browser.client.get(f"/ui/rollouts/{rollout_id}/progress").text
    gates = re.search(r'data-stage-gates="0".*?</table>', text, re.S)
    assert gates is not None, text
    block = gates.group(0)
    assert 'data-verdict="fail"' in block
    assert "130 (12 samples, 1 devices)" in block
    assert "100 (11 samples)" in block
    assert "30,245 (30 samples, 3 devices)" in block  # not 3.025e+04
    assert "+30.0% vs baseline" in block
    assert "at most +10%" in block
    assert "against the baseline" in block


def test_an_operator_pauses_and_resumes_audited_with_where_from(
    api: TestClient, fleet: list[str], browser_as: Any, engine: Engine
) -> None:
    rollout_id = start(api, canary={"count": 1}, soak_s=3600)
    oscar: Browser = browser_as("oscar")
    page = oscar.client.get(f"/ui/rollouts/{rollout_id}").text
    assert 'data-action="pause"' in page
    assert 'data-action="abort"' in page
    answer = oscar.post_form(f"/ui/rollouts/{rollout_id}/pause", {"reason": "lunch"})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/rollouts/{rollout_id}"
    assert status_of(api, rollout_id) == "paused"
    page = oscar.client.get(f"/ui/rollouts/{rollout_id}").text
    assert 'data-action="resume"' in page
    assert 'data-action="pause"' not in page
    again = oscar.post_form(f"/ui/rollouts/{rollout_id}/pause", {})
    assert again.status_code == 409
    assert "already paused" in again.text
    assert oscar.post_form(f"/ui/rollouts/{rollout_id}/resume", {}).status_code == 303
    assert status_of(api, rollout_id) == "active"
    with Session(engine) as session:
        paused = session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.paused")).one()
    assert (paused.actor, paused.reason) == ("oscar", "lunch")
    assert paused.source.endswith("(session)")


def test_abort_takes_a_reason_and_ends_the_rollout(
    api: TestClient, fleet: list[str], browser: Browser
) -> None:
    rollout_id = start(api)
    answer = browser.post_form(f"/ui/rollouts/{rollout_id}/abort", {"reason": "bad canary"})
    assert answer.status_code == 303
    detail = api.get(f"/api/v1/rollouts/{rollout_id}").json()
    assert detail["status"] == "aborted"
    assert "bad canary" in detail["reason"]
    page = browser.client.get(f"/ui/rollouts/{rollout_id}").text
    assert 'data-status="aborted"' in page
    assert 'id="rollout-actions"' not in page


def test_a_viewer_is_refused_every_action_and_nothing_changes(
    api: TestClient, fleet: list[str], browser_as: Any, engine: Engine
) -> None:
    rollout_id = start(api)
    vera: Browser = browser_as("vera")
    for action in ("pause", "resume", "approve", "abort"):
        answer = vera.post_form(f"/ui/rollouts/{rollout_id}/{action}", {"reason": "x"})
        assert answer.status_code == 403, action
    assert status_of(api, rollout_id) == "active"
    with Session(engine) as session:
        actions = session.exec(select(AuditEntry.action)).all()
    assert not any(a in actions for a in ("rollout.paused", "rollout.aborted"))


def test_an_action_without_the_csrf_token_is_refused(
    api: TestClient, fleet: list[str], browser: Browser
) -> None:
    rollout_id = start(api)
    for data in ({}, {"csrf_token": "forged"}):
        answer = browser.client.post(
            f"/ui/rollouts/{rollout_id}/pause", data=data, follow_redirects=False
        )
        assert answer.status_code == 403
        assert "CSRF" in answer.text
    assert status_of(api, rollout_id) == "active"
    with_header = browser.client.post(
        f"/ui/rollouts/{rollout_id}/pause",
        headers={"X-CSRF-Token": browser.csrf},
        follow_redirects=False,
    )
    assert with_header.status_code == 303  # as htmx sends it
    assert status_of(api, rollout_id) == "paused"


def test_an_unknown_action_is_not_a_route(
    api: TestClient, fleet: list[str], browser: Browser
) -> None:
    rollout_id = start(api)
    assert browser.post_form(f"/ui/rollouts/{rollout_id}/explode", {}).status_code == 422
    assert status_of(api, rollout_id) == "active"


def test_the_live_view_counts_in_sql_what_the_api_counts_in_python(database_url: str) -> None:
    """``rollout_progress`` (the page's) and ``rollout_detail`` (the API's) agree."""
    world = World.on(database_url)
    try:
        world.artifact("1.0")
        world.artifact("2.0", ram_bytes=12 * GB)
        for i in range(6):
            world.device(f"big-{i:02d}", hardware=report(ram_gb=32))
        world.device("small-00", hardware=report(ram_gb=4))
        rollout_id = world.create(
            canary={"count": 2},
            stages={"percents": [50, 100]},
            soak_s=0,
            gates=[{"metric": "error_rate", "max_value": 0.5}],
        )
        world.step(rollout_id)
        canaries = sorted(d for d, m in world.members(rollout_id).items() if m.stage == 0)
        world.clock.advance(seconds=5)
        world.install(canaries[0])
        world.install(canaries[1], healthy=False)
        world.step(rollout_id)
        world.clock.advance(seconds=5)
        world.step(rollout_id)
        with Session(world.db) as session:
            row = session.get(Rollout, rollout_id)
            assert row is not None
            api_view = rollout_detail(session, row).model_dump()
            page_view = rollout_progress(session, row).model_dump()
        assert api_view["devices"].get("failed") == 1  # the comparison covers a failure
        assert api_view["devices"].get("ineligible") == 1
        assert page_view == api_view
    finally:
        world.db.dispose()
