"""Policies in the dashboard: the list, one policy, new versions from text, assignments."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.dashboard.views.policies import policy_rows
from fleet.policy.views import policy_summaries
from fleet.tables import AuditEntry, Device, PolicyAssignment, PolicyRow
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import Clock, create_group, enroll

PRIMARY, SMALL = "gemma3-270m", "gemma3-270m-q2"
POLICY_TOML = f"""
description = "Lab boards"

[breaker]
minimum_calls = 4

[[chains."{PRIMARY}".tiers]]
kind = "model"
model = "{SMALL}"
when = ["out_of_memory"]

[[chains."{PRIMARY}".tiers]]
kind = "rules"
default = "Busy: try again in a minute."
"""


def set_models(api: TestClient, device_id: str, *models: str) -> None:
    body = {"models": [{"name": m} for m in models]}
    response = api.put(f"/api/v1/devices/{device_id}/desired", json=body)
    assert response.status_code == 202, response.text


@pytest.fixture
def lab(api: TestClient, clock: Clock) -> tuple[str, str]:
    """Group "lab": ``able`` serves the small model too, ``short`` only the primary."""
    create_group(api, "lab")
    able, short = (enroll(api, clock, group="lab")["device_id"] for _ in range(2))
    set_models(api, able, PRIMARY, SMALL)
    set_models(api, short, PRIMARY)
    return able, short


def versions(engine: Engine, name: str = "lab-gemma") -> list[int]:
    with Session(engine) as session:
        return sorted(session.exec(select(PolicyRow.version).where(PolicyRow.name == name)).all())


def assignments(engine: Engine) -> list[tuple[str, str, str, int]]:
    with Session(engine) as session:
        rows = session.exec(select(PolicyAssignment)).all()
        return sorted((a.scope, a.target, a.policy, a.version) for a in rows)


def create(browser: Browser, text: str = POLICY_TOML, name: str = "lab-gemma") -> Any:
    return browser.post_form("/ui/policies", {"name": name, "body": text})


def test_an_operator_creates_a_policy_from_toml_and_reads_its_chains(
    engine: Engine, browser_as: Any
) -> None:
    oscar: Browser = browser_as("oscar")
    answer = create(oscar)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/policies/lab-gemma?version=1"
    assert versions(engine) == [1]
    with Session(engine) as session:
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "policy.create")).one()
    assert (entry.actor, entry.reason) == ("oscar", "Lab boards")
    assert entry.source.endswith("(session)")
    page = oscar.client.get("/ui/policies/lab-gemma").text
    chain = re.search(rf'<tr data-chain="{PRIMARY}">(.*?)</tr>', page, re.S)
    assert chain is not None
    assert f"1. {SMALL} [out_of_memory]" in chain.group(1)
    assert "2. rules (0 rules + a default answer)" in chain.group(1)
    assert "once 4 of the last 20 calls" in page
    listing = oscar.client.get("/ui/policies").text
    assert 'data-policy="lab-gemma"' in listing
    assert "Lab boards" in listing


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[breaker\nminimum_calls = 4", "not valid TOML"),
        ('{"chains": ', "not valid JSON"),
        ("version = 3", "leave 'version' out"),
        ('name = "other"', "another policy"),
        ("colour = 'red'", "unknown keys colour"),
        ("[breaker]\nminimum_calls = 40", "breaker: minimum_calls (40) cannot exceed"),
        (
            f'[[chains."{PRIMARY}".tiers]]\nkind = "model"\nmodel = "{PRIMARY}"',
            f"chains.{PRIMARY}.tiers.0.model",
        ),
        ("", "type the policy"),
    ],
)
def test_a_bad_policy_text_is_refused_beside_the_text_and_nothing_stored(
    engine: Engine, browser: Browser, text: str, words: str
) -> None:
    answer = create(browser, text)
    assert answer.status_code == 422, answer.text
    message = re.search(r'id="err-body">([^<]+)<', answer.text)
    assert message is not None, answer.text
    assert words in message.group(1).replace("&#39;", "'").replace("&#34;", '"'), message.group(1)
    assert versions(engine) == []


def test_a_new_version_from_the_edited_text_and_the_old_one_kept(
    engine: Engine, browser: Browser
) -> None:
    assert create(browser).status_code == 303
    page = browser.client.get("/ui/policies/lab-gemma").text
    start = re.search(r'<textarea name="body" rows="18"[^>]*>(.*?)</textarea>', page, re.S)
    assert start is not None
    body = json.loads(start.group(1).replace("&#34;", '"'))  # this version, ready to edit
    body["breaker"]["minimum_calls"] = 5
    answer = browser.post_form("/ui/policies/lab-gemma/versions", {"body": json.dumps(body)})
    assert answer.status_code == 303, answer.text
    assert versions(engine) == [1, 2]
    assert "once 5 of the last" in browser.client.get("/ui/policies/lab-gemma").text
    assert "once 4 of the last" in browser.client.get("/ui/policies/lab-gemma?version=1").text
    bad = browser.post_form("/ui/policies/lab-gemma/versions", {"body": '{"chains": []}'})
    assert bad.status_code == 422
    assert "must be a table" in bad.text
    assert versions(engine) == [1, 2]


def test_assigning_to_a_group_lists_who_got_it_and_who_cannot(
    api: TestClient, engine: Engine, lab: tuple[str, str], browser_as: Any
) -> None:
    able, short = lab
    oscar: Browser = browser_as("oscar")
    assert create(oscar).status_code == 303
    answer = oscar.post_form("/ui/policies/lab-gemma/assign", {"group": "lab", "version": "1"})
    assert answer.status_code == 200, answer.text
    outcome = re.search(r'id="assign-outcome".*?</article>', answer.text, re.S)
    assert outcome is not None
    assert '<span data-count="updated">1</span>' in outcome.group(0)
    skipped = re.search(rf'data-skipped="{short}"><td>[^<]+</td><td><small>([^<]+)<', answer.text)
    assert skipped is not None
    assert SMALL in skipped.group(1)
    assert assignments(engine) == [("group", "lab", "lab-gemma", 1)]
    desired = api.get(f"/api/v1/devices/{able}").json()
    assert "lab-gemma" in json.dumps(desired)
    with Session(engine) as session:
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "policy.assign")).one()
    assert entry.actor == "oscar"
    listing = oscar.client.get("/ui/policies").text
    assert 'data-assignment="group:lab"' in listing
    # Unassigning takes it back.
    undone = oscar.post_form("/ui/policies/lab-gemma/unassign", {"scope": "group", "target": "lab"})
    assert undone.status_code == 200, undone.text
    assert "Removed: lab-gemma v1 from group lab" in undone.text
    assert assignments(engine) == []
    missing = oscar.post_form(
        "/ui/policies/lab-gemma/unassign", {"scope": "group", "target": "lab"}
    )
    assert missing.status_code == 404


def test_assignment_errors_are_shown_at_the_form(
    engine: Engine, lab: tuple[str, str], browser: Browser
) -> None:
    assert create(browser).status_code == 303
    for fields, status, words in [
        ({}, 422, "choose a group or type a device"),
        ({"group": "lab", "device": "x"}, 422, "one of them"),
        ({"device": "ghost-device"}, 404, "ghost-device"),
        ({"group": "lab", "version": "7"}, 404, "no version 7"),
    ]:
        answer = browser.post_form("/ui/policies/lab-gemma/assign", fields)
        assert answer.status_code == status, (fields, answer.text)
        message = re.search(r'id="err-assign" role="alert">([^<]+)<', answer.text)
        assert message is not None, fields
        assert words in message.group(1).replace("&#39;", "'"), message.group(1)
    assert assignments(engine) == []


def test_a_viewer_reads_but_every_change_is_refused(
    engine: Engine, lab: tuple[str, str], browser: Browser, browser_as: Any
) -> None:
    assert create(browser).status_code == 303
    vera: Browser = browser_as("vera")
    page = vera.client.get("/ui/policies/lab-gemma")
    assert page.status_code == 200
    for form_id in ("assign-form", "version-form"):
        assert f'id="{form_id}"' not in page.text
    assert 'id="policy-form"' not in vera.client.get("/ui/policies").text
    refused = [
        create(vera, name="other"),
        vera.post_form("/ui/policies/lab-gemma/versions", {"body": POLICY_TOML}),
        vera.post_form("/ui/policies/lab-gemma/assign", {"group": "lab"}),
        vera.post_form("/ui/policies/lab-gemma/unassign", {"scope": "group", "target": "lab"}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert versions(engine) == [1]
    assert versions(engine, "other") == []
    assert assignments(engine) == []


def test_an_assignment_without_the_csrf_token_is_refused(
    engine: Engine, lab: tuple[str, str], browser: Browser
) -> None:
    assert create(browser).status_code == 303
    answer = browser.client.post(
        "/ui/policies/lab-gemma/assign", data={"group": "lab"}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert assignments(engine) == []


def test_the_list_counts_in_sql_what_the_api_counts_device_by_device(
    api: TestClient, clock: Clock, engine: Engine, lab: tuple[str, str], browser: Browser
) -> None:
    able, short = lab
    create_group(api, "shelf")
    own, plain = (enroll(api, clock, group="shelf")["device_id"] for _ in range(2))
    set_models(api, own, PRIMARY, SMALL)
    assert create(browser).status_code == 303
    assert create(browser, name="other").status_code == 303
    assert create(browser).status_code == 303  # lab-gemma v2
    for fields in ({"group": "lab", "version": "1"}, {"group": "shelf", "version": "2"}):
        assert browser.post_form("/ui/policies/lab-gemma/assign", fields).status_code == 200
    assert browser.post_form("/ui/policies/other/assign", {"device": own}).status_code == 200
    with Session(engine) as session:
        digests = {(r.name, r.version): r.digest for r in session.exec(select(PolicyRow)).all()}
        reports = {
            able: digests[("lab-gemma", 1)],  # enforcing its group's version
            short: digests[("lab-gemma", 2)],  # a digest, but of another version
            own: digests[("other", 1)],  # its own assignment wins over its group's
        }
        for device_id, digest in reports.items():
            device = session.get(Device, device_id)
            assert device is not None
            device.reported = {"device_id": device_id, "policy": {"digest": digest}}
            session.add(device)
        session.commit()
        listed = policy_rows(session)
        assert listed == policy_summaries(session)
    counts = {p.name: (p.devices_assigned, p.devices_enforcing) for p in listed}
    assert counts == {"lab-gemma": (3, 1), "other": (1, 1)}
    assert plain not in reports
