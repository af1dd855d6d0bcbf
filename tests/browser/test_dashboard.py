"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Against a real controller with simulated devices and one real agent (the ``world``
of conftest.py), as its users would: signing in and out, finding a device, watching
a rollout move and a bad one stop, pausing and resuming, and being refused what a
role or a missing CSRF token does not allow. Waits are Playwright's own auto-waiting
assertions, bounded by generous timeouts; nothing here measures how fast a page is.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from fleet.api.deps import SESSION_COOKIE
from tests.browser.conftest import (
    AGENT_NAME,
    LLM,
    PASSWORD,
    SignedIn,
    World,
    csrf_of,
    screenshot,
)

pytestmark = pytest.mark.integration

LIVE_S = 30_000  # ms: bound on waiting for a live update (SSE, every 0.5 s; a loaded machine)
ROLLOUT_S = 120_000  # ms: bound on waiting for a rollout to finish


def test_signing_in_with_a_wrong_password_then_the_right_one_and_out(
    page: Page, world: World
) -> None:
    page.goto("/ui/devices")
    page.wait_for_url("**/ui/login?next=/ui/devices")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    screenshot(page, "login")
    page.get_by_label("Name").fill("ada")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong name or password.")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/devices")  # back where the visit started
    expect(page.locator(".who")).to_contain_text("ada")
    expect(page.locator(".who .role")).to_have_text("admin")
    copied = page.context.cookies()
    page.locator("#logout").click()
    page.wait_for_url("**/ui/login")
    assert SESSION_COOKIE not in {c["name"] for c in page.context.cookies()}
    page.goto("/ui/")
    page.wait_for_url("**/ui/login?next=/ui/")
    # The session was ended on the server: a copy of its cookie lets nobody in.
    page.context.add_cookies(copied)  # type: ignore[arg-type]
    page.goto("/ui/")
    page.wait_for_url("**/ui/login?next=/ui/")


_DECODED = frozenset({"content-encoding", "content-length", "transfer-encoding"})  # httpx undid


def test_a_dashboard_without_an_admin_user_says_how_to_make_one(page: Page, world: World) -> None:
    """The pages as the world's controller served them before its first user was made.

    Replayed into the browser (its styles come from the controller), so no second
    controller has to start just to have no admin.
    """
    served = world.before_admin
    assert served["/ui/login"].status_code == 503  # no signing in either
    answer = served["/ui/"]

    def replay(route: Route) -> None:
        route.fulfill(
            status=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k not in _DECODED},
            body=answer.content,
        )

    page.route(f"{world.url}/ui/", replay)
    response = page.goto("/ui/")
    assert response is not None
    assert response.status == 503
    expect(page.get_by_role("heading", level=1)).to_have_text("No admin user yet")
    expect(page.locator("pre code")).to_contain_text("edgefleet users create NAME --admin")
    expect(page.locator(".topbar")).to_have_count(0)  # nobody is signed in: no navigation
    screenshot(page, "no-admin")


def test_a_form_post_without_its_csrf_token_is_refused(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    signed_in(page, "ada")
    # Signing out is a form post like any other write: without the token it is refused.
    refused = page.request.post("/ui/logout", form={"x": "1"}, max_redirects=0)
    assert refused.status == 403, refused.text()
    page.reload()
    expect(page.locator(".who")).to_contain_text("ada")  # still signed in
    # The rollout page's pause form, with its hidden csrf_token input removed.
    hold = world.rollouts["hold"]
    page.goto(f"/ui/rollouts/{hold}")
    pause = page.get_by_role("button", name=re.compile("^Pause"))
    expect(pause).to_be_visible()
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove())")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        pause.click()
    assert posted.value.status == 403
    assert world.rollout(hold)["status"] == "active"  # nothing changed
    direct = page.request.post(
        f"/ui/rollouts/{hold}/pause", form={"reason": "no token"}, max_redirects=0
    )
    assert direct.status == 403, direct.text()
    assert world.rollout(hold)["status"] == "active"


def test_a_viewer_sees_no_rollout_buttons_and_the_api_refuses_her(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    hold = world.rollouts["hold"]
    signed_in(page, "vera")
    expect(page.locator(".who .role")).to_have_text("viewer")
    page.goto("/ui/rollouts")
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    expect(page.get_by_text(re.compile("New rollout", re.I))).to_have_count(0)
    page.goto(f"/ui/rollouts/{hold}")
    expect(page.get_by_text("hold for pause").first).to_be_visible()
    for action in ("Pause", "Resume", "Approve", "Abort", "New rollout", "Create"):
        expect(page.get_by_role("button", name=re.compile(action, re.I))).to_have_count(0)
        expect(page.get_by_role("link", name=re.compile(f"^{action}", re.I))).to_have_count(0)
    # Her session, with her CSRF token: the API refuses the write for her role.
    answer = page.request.post(
        f"/api/v1/rollouts/{hold}/pause", headers={"X-CSRF-Token": csrf_of(page)}, data={}
    )
    assert answer.status == 403, answer.text()
    # An API token of hers, made by the admin with the CLI: refused too.
    made = json.loads(
        world.cli("users", "token", "create", "--name", "ci", "--user", "vera", "--json")
    )
    refused = httpx.post(
        f"{world.url}/api/v1/rollouts/{hold}/pause",
        json={},
        headers={"Authorization": f"Bearer {made['secret']}"},
        timeout=15,
    )
    assert refused.status_code == 403, refused.text
    assert world.rollout(hold)["status"] == "active"


def test_finding_the_real_agent_by_search_and_opening_its_page(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    signed_in(page, "ada")
    page.goto("/ui/devices")
    rows = page.locator("#device-table tbody tr")
    expect(rows).to_have_count(sum(len(ids) for ids in world.devices.values()) + 1)
    screenshot(page, "devices")
    page.get_by_role("searchbox", name="Search devices by name or id").fill("orin-lab")
    expect(rows).to_have_count(1)  # htmx swaps the table as the search is typed
    rows.get_by_role("link", name=AGENT_NAME).click()
    page.wait_for_url(f"**/ui/devices/{world.agent_id}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(AGENT_NAME)
    expect(page.locator('#device-state tr[data-model="minilm"]')).to_contain_text("ready")
    expect(page.locator("#device-capabilities")).not_to_contain_text("has not described")
    screenshot(page, "device-detail")


def stays_loaded(page: Page) -> None:
    """Mark the document, so :func:`was_not_reloaded` can tell a reload happened."""
    page.evaluate("window.edgefleetTestMark = 'same page'")


def was_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.edgefleetTestMark") == "same page", "the page was reloaded"


def test_a_device_report_shows_on_its_open_page_without_reloading(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    (device,) = world.devices["live"]
    signed_in(page, "ada")
    page.goto(f"/ui/devices/{device}")
    reported = page.locator(f'#device-state tr[data-model="{LLM}"] td').nth(2)
    expect(reported).to_have_text(re.compile(r"^\s*1\.0\b"))
    stays_loaded(page)
    world.call(
        "PUT",
        f"/api/v1/devices/{device}/desired",
        202,
        json={"models": [{"name": LLM, "version": "2.0"}]},
    )
    # The simulated device installs 2.0 and reports it; the open page shows it (SSE).
    expect(reported).to_have_text(re.compile(r"^\s*2\.0\b"), timeout=LIVE_S)
    was_not_reloaded(page)


def test_creating_a_rollout_from_the_form_and_watching_it_complete(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    signed_in(page, "ada")
    page.goto("/ui/rollouts")
    expect(page.locator(f'tr[data-rollout="{world.rollouts["hold"]}"]')).to_be_visible()
    screenshot(page, "rollouts")
    page.locator("#new-rollout").click()
    page.wait_for_url("**/ui/rollouts/new")
    form = page.locator("#rollout-form")
    form.locator('[name="change"]').select_option(f"model|{LLM}|2.0")
    form.locator('[name="target_groups"]').fill("lab")
    form.locator('[name="canary_kind"]').select_option("count")
    form.locator('[name="canary_value"]').fill("1")
    form.locator('[name="waves"]').fill("100")
    form.locator('[name="soak_s"]').fill("1")
    form.locator('[name="check_interval_s"]').fill("0.5")
    page.locator("#preview-button").click()
    expect(page.locator("#preview-targeted")).to_have_text(str(len(world.devices["lab"])))
    expect(page.locator("#preview-eligible")).to_have_text(str(len(world.devices["lab"])))
    expect(page.locator("#preview-refusal")).to_have_count(0)
    screenshot(page, "rollout-new")
    page.locator("#start-button").click()
    page.wait_for_url(re.compile(r".*/ui/rollouts/ro-[0-9a-f]+$"))
    stays_loaded(page)
    expect(page.locator("#rollout-status")).to_have_text("completed", timeout=ROLLOUT_S)
    expect(page.locator("#rollout-updated")).to_have_text(str(len(world.devices["lab"])))
    was_not_reloaded(page)
    screenshot(page, "rollout")


def test_pausing_and_resuming_a_rollout(page: Page, world: World, signed_in: SignedIn) -> None:
    hold = world.rollouts["hold"]
    signed_in(page, "oscar")  # an operator may
    page.goto(f"/ui/rollouts/{hold}")
    status = page.locator("#rollout-status")
    expect(status).to_have_text("active")
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(status).to_have_text("paused")
    assert world.rollout(hold)["status"] == "paused"
    expect(page.get_by_role("button", name="Pause", exact=True)).to_have_count(0)
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(status).to_have_text("active")
    assert world.rollout(hold)["status"] == "active"
    audit = page.locator("table.audit")
    expect(audit).to_contain_text("rollout.paused")
    expect(audit).to_contain_text("rollout.resumed")


def test_a_rollout_whose_canary_regressed_shows_aborted_with_its_gate_evidence(
    page: Page, world: World, signed_in: SignedIn
) -> None:
    rollout = world.rollouts["canary"]
    signed_in(page, "ada")
    page.goto(f"/ui/rollouts/{rollout}")
    expect(page.locator("#rollout-status")).to_have_text("aborted", timeout=ROLLOUT_S)
    expect(page.locator("#rollout-reason")).to_contain_text("p95_latency_ms")
    gate = page.locator('tr[data-stage-gates="0"] tr[data-gate="0"]')
    expect(gate).to_contain_text("p95_latency_ms")
    expect(gate.locator("[data-verdict]")).to_have_text("fail")
    canaries = page.locator('table.stages tr[data-stage="0"] td[data-state="rolled_back"]')
    expect(canaries).to_have_text("2")  # both canaries went back to 1.0
    screenshot(page, "rollout-aborted")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/ui/", "overview"),
        ("/ui/models", "models"),
        ("/ui/policies", "policies"),
        ("/ui/alerts", "alerts"),
        ("/ui/audit", "audit"),
        ("/ui/tokens", "tokens"),
        ("/ui/users", "users"),
    ],
)
def test_each_main_page_opens_for_an_admin(
    page: Page, world: World, signed_in: SignedIn, path: str, name: str
) -> None:
    signed_in(page, "ada")
    response = page.goto(path)
    assert response is not None
    assert response.status == 200
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    expect(page.locator('nav a[aria-current="page"]')).to_have_count(1)
    screenshot(page, name)
