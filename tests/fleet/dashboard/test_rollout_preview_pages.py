"""The rollout preview on the create form: stages and ineligible devices, nothing created.

The preview's agreement with the engine is tested on its own in
``tests/fleet/test_rollout_preview.py``; here the page: what the fragment shows for a
fleet, that starting the same form stores the counts it showed, and that it refuses
what the form would refuse, writing nothing.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.tables import Device
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.dashboard.test_rollouts_pages import (
    MODEL,
    fleet,
    form,
    register,
    rollouts,
    start,
)

__all__ = ["fleet"]  # a fixture shared with the rollout pages' tests


def test_the_preview_shows_stages_and_ineligible_devices_and_creates_nothing(
    api: TestClient, fleet: list[str], browser: Browser, engine: Engine
) -> None:
    register(engine, "5.0", ram_bytes=6 * 2**30)  # the enrolled boxes have 8 GiB
    big, small = fleet[:2], fleet[2:]
    with Session(engine) as session:  # two of them report less memory
        for device_id in small:
            device = session.get(Device, device_id)
            assert device is not None
            device.device_report = {**device.device_report, "ram_total_bytes": 4 * 2**30}
            session.add(device)
        session.commit()
    fields = form(change=f"model|{MODEL}|5.0", canary_kind="count", canary_value="1")
    answer = browser.post_form("/ui/rollouts/preview", fields, headers={"HX-Request": "true"})
    assert answer.status_code == 200, answer.text
    text = answer.text
    assert re.search(r'id="preview-targeted">4<', text)
    assert re.search(r'id="preview-eligible">2<', text)
    stages = re.findall(
        r'data-stage="(\d)">\s*<td>([^<]+)</td>\s*<td data-count="devices">(\d+)</td>\s*'
        r'<td data-count="cumulative">(\d+)</td>',
        text,
    )
    assert stages == [("0", "canary", "1", "1"), ("1", "100%", "1", "2")]
    shown = sorted(re.findall(r"preview-ineligible.*", text, re.S)[0].count(d) > 0 for d in small)
    assert shown == [True, True]
    assert all(f'data-device="{d}"' not in text for d in big)
    assert rollouts(engine) == []
    # Start the same form: the stored quotas are the ones previewed.
    created = browser.post_form("/ui/rollouts", fields)
    assert created.status_code == 303, created.text
    (row,) = rollouts(engine)
    detail = api.get(f"/api/v1/rollouts/{row.id}").json()
    assert [(s["name"], s["quota"]) for s in detail["stage_progress"]] == [
        ("canary", 1),
        ("100%", 2),
    ]
    assert detail["devices"].get("ineligible") == 2


def test_the_preview_lists_the_form_errors_instead(
    fleet: list[str], browser: Browser, engine: Engine
) -> None:
    answer = browser.post_form("/ui/rollouts/preview", form(target_groups="nowhere"))
    assert answer.status_code == 200
    assert 'data-field="target_groups"' in answer.text
    assert "nowhere" in answer.text
    assert rollouts(engine) == []


def test_the_preview_says_a_rival_would_refuse_it(
    api: TestClient, fleet: list[str], browser: Browser
) -> None:
    first = start(api)
    answer = browser.post_form("/ui/rollouts/preview", form())
    assert 'id="preview-refusal"' in answer.text
    assert first in answer.text
