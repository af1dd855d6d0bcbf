"""One fleet for every browser scenario, and a fresh Chromium context per test.

The world is started once for the package (a real Mosquitto, a real ``edgefleet
serve`` on SQLite, ten devices from ``edgefleet simulate`` and one real agent serving
MiniLM) because starting it is most of the cost; the scenarios share it and keep to
their own groups so they do not disturb each other:

- ``lab`` (3 devices): the rollout a test creates from the form and watches complete;
- ``canary`` (4): a rollout to a version the simulator makes 3x slower, started here
  so its gate has failed by the time its test looks;
- ``hold`` (2): a rollout that soaks for an hour, paused and resumed by the tests and
  refused to a viewer and to a form post without its CSRF token;
- ``live`` (1): a device whose page is open while it reports a new version;
- ``agents``: the real agent.

Users are made with the real CLI and the admin token in the controller's data folder.
Chromium is Debian's (``/usr/bin/chromium``; scripts/test installs it): Playwright
cannot download its own browser here. Screenshots go to ``$EDGEFLEET_SCREENSHOTS``
(default ``.artifacts/screenshots``), full page at 1440x900.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from agent.catalog import BUNDLED
from agent.store import ModelStore
from scripts.servers import EDGEFLEET, Controller, mosquitto, running_controller
from tests.conftest import AgentProcess, start_agent
from tests.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("EDGEFLEET_SCREENSHOTS") or REPO / ".artifacts" / "screenshots")
VIEWPORT = {"width": 1440, "height": 900}
PASSWORD = "correct horse battery staple"
USERS = {"ada": "admin", "oscar": "operator", "vera": "viewer"}
LLM = "gemma3-270m"
VERSIONS = {v: f"GGUF {v} ".encode() + bytes(range(256)) * 40 for v in ("1.0", "2.0", "3.0")}
GROUPS = {"lab": 3, "canary": 4, "hold": 2, "live": 1}  # simulated devices in each
# A fallback policy, stored but assigned to no one: the policies page has one to list.
POLICY = {
    "name": "lab-fallback",
    "description": "Gemma falls back to a fixed answer",
    "chains": {LLM: {"tiers": [{"kind": "rules", "default": "Busy; try again soon."}]}},
}
AGENT_NAME = "orin-lab-42"  # the real agent's name, renamed so a search finds only it
EVERY_S = 0.2  # seconds between probes of the controller
WAIT_S = 90.0  # for what the world needs before the first test: generous on 2 loaded cores


@dataclass
class World:
    """What the scenarios share: the controller, its devices and rollouts, helpers."""

    controller: Controller
    admin_token: str
    agent: AgentProcess
    agent_id: str
    devices: dict[str, list[str]]  # group -> simulated device ids
    rollouts: dict[str, str] = field(default_factory=dict)  # "hold", "canary" -> rollout id
    # The pages as served before any user existed: path -> the controller's answer.
    before_admin: dict[str, httpx.Response] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.controller.url

    def api(self) -> httpx.Client:
        """A client with the controller's admin token."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_token}", "X-Edgefleet-Actor": "tests"},
            timeout=15,
        )

    def call(self, method: str, path: str, status: int | tuple[int, ...] = 200, **kw: Any) -> Any:
        statuses = (status,) if isinstance(status, int) else status
        with self.api() as api:
            response = api.request(method, path, **kw)
        assert response.status_code in statuses, f"{method} {path}: {response.text}"
        return response.json() if response.content else None

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/api/v1/rollouts/{rollout_id}"))

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """``edgefleet *args`` against this controller, with the admin token of its data dir."""
        return cli(self.controller, *args, stdin=stdin)


# The CLI finds the admin token in the data folder, not in a variable of the caller's.
_CLI_ENV = {k: v for k, v in os.environ.items() if "TOKEN" not in k}


def _cli(controller: Controller, *args: str) -> list[str]:
    return [str(EDGEFLEET), *args, "--url", controller.url, "--data-dir", str(controller.data_dir)]


def cli(controller: Controller, *args: str, stdin: str | None = None) -> str:
    command = _cli(controller, *args)
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=60, env=_CLI_ENV
    )
    assert result.returncode == 0, f"edgefleet {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def serving(world: World, device_id: str) -> str | None:
    """The version of the LLM a device reports ready."""
    reported = world.call("GET", f"/api/v1/devices/{device_id}")["reported"] or {}
    for model in reported.get("models", []):
        if model["name"] == LLM and model["state"] == "ready":
            return str(model.get("version"))
    return None


@contextmanager
def simulated_fleet(
    controller: Controller, token: str, devices: int, folder: Path
) -> Iterator[None]:
    """``edgefleet simulate``: every device starts on an unregistered 0.9 of the LLM; 2.0
    is clean (no errors, so no gate fails by chance) and 3.0 three times slower."""
    log = folder / "simulate.log"
    command = [
        str(EDGEFLEET), "simulate", "--devices", str(devices), "--token", token,
        "--fleet-url", controller.url, "--interval", "0.25", "--state-dir", str(folder / "sim"),
        "--hardware", "x86-cpu-8g", "--model", f"{LLM}@0.9", "--update-time", "0.1",
        "--regress", f"{LLM}@2.0:errors=0", "--regress", f"{LLM}@3.0:latency=3", "--quiet",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _users(controller: Controller) -> Iterator[None]:
    """ada (admin), oscar (operator) and vera (viewer), made with the real CLI meanwhile."""
    running = []
    for name, role in USERS.items():
        how = ["--admin"] if role == "admin" else ["--role", role]
        command = _cli(controller, "users", "create", name, *how, "--password-stdin")
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=_CLI_ENV, text=True,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(PASSWORD + "\n")  # it reads one line
        proc.stdin.flush()
        running.append((name, proc))
    yield
    for name, proc in running:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"edgefleet users create {name}:\n{out}"


def _registry(world: World) -> None:
    for group in ("fleet", "agents", *GROUPS):
        world.call("POST", "/api/v1/groups", 201, json={"name": group})
    world.call("POST", "/api/v1/policies", 201, json=POLICY)  # so its page is not empty
    for version, data in VERSIONS.items():
        world.call(
            "POST",
            f"/api/v1/models/{LLM}/versions/{version}",
            (200, 201),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )


def _place_devices(world: World, total: int) -> None:
    """Wait for the simulated devices, then move them from ``fleet`` into their groups on 1.0."""

    def enrolled() -> list[str]:
        items = world.call("GET", "/api/v1/devices", params={"group": "fleet", "limit": 100})
        ids = sorted(d["id"] for d in items["items"])
        return ids if len(ids) == total else []

    ids = wait_until(enrolled, f"{total} simulated devices enrolled", within_s=WAIT_S)
    for group, count in GROUPS.items():
        world.devices[group], ids = ids[:count], ids[count:]
        for device_id in world.devices[group]:
            world.call("PATCH", f"/api/v1/devices/{device_id}", json={"group": group})
        world.call(
            "PUT",
            f"/api/v1/groups/{group}/desired",
            202,
            json={"models": [{"name": LLM, "version": "1.0"}]},
        )
    everyone = [d for group in GROUPS for d in world.devices[group]]
    wait_until(
        lambda: all(serving(world, d) == "1.0" for d in everyone),
        "every simulated device on 1.0",
        within_s=WAIT_S,
        every_s=EVERY_S,
    )


HOLD_SPEC = {
    "name": "hold for pause",
    "change": {"model": LLM, "version": "2.0"},
    "target": {"groups": ["hold"]},
    "canary": {"count": 1},
    "stages": {"percents": [100]},
    "soak_s": 3600,  # the canary soaks for an hour: the rollout stays active
    "check_interval_s": 60,
    "approval": True,
}
CANARY_SPEC = {
    "name": "slow canary",
    "change": {"model": LLM, "version": "3.0"},
    "target": {"groups": ["canary"]},
    "canary": {"count": 2},
    "stages": {"percents": [100]},
    "soak_s": 30,
    "check_interval_s": 1,
    "gates": [
        {
            "metric": "p95_latency_ms",
            "window_s": 10,
            "min_samples": 3,
            "max_increase_percent": 20,
            "max_consecutive_failures": 2,
        }
    ],
}


def _start_rollouts(world: World) -> None:
    """Both at once: the canary's gate compares its 3x slower canaries with the two
    devices of the group not yet updated (the control), so it needs no baseline first."""
    for name, spec in (("hold", HOLD_SPEC), ("canary", CANARY_SPEC)):
        world.rollouts[name] = world.call("POST", "/api/v1/rollouts", 201, json=spec)["id"]


def _agent(world: World, tmp: Path, token: str) -> AgentProcess:
    store = tmp / "store"
    ModelStore(store).install_bundled(BUNDLED["minilm"])
    settings = {
        "fleet": {
            "url": world.url,
            "token": token,
            "state_dir": tmp / "agent-state",
            "telemetry_interval_s": 1.0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 2.0,
        }
    }
    return start_agent(tmp, store, settings=settings, models=[{"name": "minilm"}], wait=False)


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The shared fleet (see the module docstring), ready, with both rollouts started."""
    tmp = tmp_path_factory.mktemp("browser")
    database = tmp / "fleet.db"
    with (
        mosquitto(tmp / "mosquitto") as broker,
        running_controller(
            tmp,
            f"sqlite:///{database}",
            "--broker", broker.url,
            "--broker-auth-dir", str(broker.auth_dir),
            "--broker-pid-file", str(broker.pid_file),
            env={"EDGEFLEET_FLEET_ROLLOUT_INTERVAL_S": "0.2"},
            ready_s=60,
        ) as controller,
    ):  # fmt: skip
        token = (controller.data_dir / "admin-token").read_text().strip()
        world = World(controller, token, None, "", {})  # type: ignore[arg-type]
        for path in ("/ui/", "/ui/login"):
            world.before_admin[path] = httpx.get(f"{controller.url}{path}", timeout=15)
        _registry(world)
        total = sum(GROUPS.values())
        sim_token = world.call(
            "POST", "/api/v1/tokens", 201, json={"uses": total, "group": "fleet"}
        )
        agent_token = world.call("POST", "/api/v1/tokens", 201, json={"group": "agents"})
        world.agent = _agent(world, tmp, agent_token["secret"])
        try:
            with simulated_fleet(controller, sim_token["secret"], total, tmp):
                with _users(controller):
                    _place_devices(world, total)
                    _start_rollouts(world)
                identity = tmp / "agent-state" / "identity.json"
                wait_until(
                    identity.exists,
                    "the agent to enroll",
                    within_s=WAIT_S,
                    every_s=EVERY_S,
                    detail=world.agent.tail,
                )
                world.agent_id = json.loads(identity.read_text())["device_id"]
                world.call("PATCH", f"/api/v1/devices/{world.agent_id}", json={"name": AGENT_NAME})
                wait_until(
                    lambda: (
                        world.call("GET", f"/api/v1/devices/{world.agent_id}")["status"] == "online"
                    ),
                    "the agent online",
                    within_s=WAIT_S,
                    every_s=EVERY_S,
                    detail=world.agent.tail,
                )
                yield world
        finally:
            world.agent.stop()


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="package")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: install Debian's chromium (scripts/test does)")
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    yield browser
    browser.close()


@pytest.fixture
def context(chromium: Browser, world: World) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) on the world's controller."""
    opened = chromium.new_context(base_url=world.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    opened.set_default_timeout(15_000)
    yield opened
    opened.close()


# What Chromium logs for an answer the test asked for (a 403, a 401): not a page's fault.
EXPECTED_ERRORS = re.compile(r"Failed to load resource|Response Status Error Code")


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A page that fails its test on a script error or a CSP violation in any page it shows."""
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(f"script error: {exc}"))
    opened.on(
        "console",
        lambda msg: (
            errors.append(f"console {msg.type}: {msg.text} ({msg.location.get('url')})")
            if msg.type == "error" and not EXPECTED_ERRORS.search(msg.text)
            else None
        ),
    )
    yield opened
    assert not errors, "the pages logged errors:\n" + "\n".join(errors)


def sign_in(page: Page, name: str, password: str = PASSWORD, next_path: str = "/ui/") -> None:
    """Sign in through the real form, landing on ``next_path``."""
    page.goto(f"/ui/login?next={next_path}")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{next_path}")
    expect(page.locator(".who")).to_contain_text(name)


class SignedIn:
    """Signs a page in as a user: through the form the first time, then with that session.

    Each user's session cookie is kept for the package, so a scenario about rollouts
    does not pay for the sign-in form (and its password hash) again; the sign-in
    scenario itself uses :func:`sign_in`, and signs out only its own session.
    """

    def __init__(self) -> None:
        self.cookies: dict[str, list[Any]] = {}  # name -> the context's cookies

    def __call__(self, page: Page, name: str) -> None:
        if name not in self.cookies:
            sign_in(page, name)
            self.cookies[name] = list(page.context.cookies())
            return
        page.context.add_cookies(self.cookies[name])
        page.goto("/ui/")
        expect(page.locator(".who")).to_contain_text(name)


@pytest.fixture(scope="package")
def signed_in() -> SignedIn:
    return SignedIn()


def csrf_of(page: Page) -> str:
    """The session's CSRF token, as the page carries it for htmx (``<body hx-headers>``)."""
    headers = json.loads(page.locator("body").get_attribute("hx-headers") or "{}")
    return str(headers["X-CSRF-Token"])


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG of what the page shows now, for people to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
