"""Degraded mode through the fleet link: the policy comes signed, is kept, and holds offline.

In-process (FastAPI's TestClient runs the lifespan) with a real Mosquitto and desired
states signed by a real TUF repository's director key, as in ``test_link_app``. The
policy travels in ``DesiredState.fallback``; these tests check that only a verified,
newer desired state changes it, that a malformed one is refused with an event while
the rest of its state is acted on, that the real Gemma failing under fault injection
is answered by the fallback tier while the broker is down (the breaker's event is
spooled and arrives once it is back), and that a restart without the broker enforces
the saved policy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from agent.api.app import create_app
from agent.api.deps import AgentState
from agent.config import AgentSettings, LinkSettings
from models.policy import (
    BreakerSettings,
    Chain,
    FallbackPolicy,
    Rule,
    RulesTier,
    policy_digest,
)
from models.wire import DesiredModel, DesiredState
from scripts.servers import MosquittoBroker
from tests.agent.link_support import (
    Director,
    Watcher,
    authorize,
    controller_client,
    make_director,
    shared_director,
    write_identity,
)
from tests.polling import wait_until

pytestmark = pytest.mark.integration  # a real Mosquitto (and the real Gemma for one test)

WITHIN_S = 30.0  # seconds: the app's background tasks reach the broker and load models
REQUEST_S = 60.0  # seconds: no request may take longer (Gemma on a loaded 2-core machine)
DEVICE = "dev-degraded-1"
PASSWORD = "degraded-secret"
DESIRED = f"edgefleet/v1/devices/{DEVICE}/desired"
GEMMA = "gemma3-270m"
RESTING = "The assistant is resting; try again later."
ROUTER = "Unplug the router for ten seconds."

T = TypeVar("T")
Reply = Any  # a TestClient response: httpx's or httpx2's, by the Starlette version


def policy(version: int, *, model: str = GEMMA, name: str = "edge-default") -> FallbackPolicy:
    """A rules-only chain for ``model``: it opens after two failures and stays open."""
    return FallbackPolicy(
        name=name,
        version=version,
        breaker=BreakerSettings(
            failure_rate_threshold=50,
            minimum_calls=2,
            sliding_window=2,
            wait_in_open=3600,
            permitted_calls_in_half_open=1,
        ),
        chains={
            model: Chain(
                tiers=(
                    RulesTier(
                        rules=(Rule(keywords=("router",), answer=ROUTER),),
                        default=f"{RESTING} (policy v{version})",
                    ),
                ),
                retry_after=7,
            )
        },
    )


def desired(
    version: int, fallback: FallbackPolicy | dict[str, Any] | None, models: Sequence[str] = ()
) -> DesiredState:
    raw = fallback.model_dump(mode="json") if isinstance(fallback, FallbackPolicy) else fallback
    return DesiredState(
        device_id=DEVICE,
        version=version,
        models=[DesiredModel(name=m) for m in models],
        fallback=raw or {},
    )


def within(call: Callable[[], T], seconds: float = REQUEST_S) -> T:
    """``call()`` in a thread, failing the test if it has not returned in ``seconds``."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@dataclass
class World:
    """A device's state folder, its settings, and the controller's side of the broker."""

    broker: MosquittoBroker
    state_dir: Path
    settings: AgentSettings
    loop: asyncio.AbstractEventLoop
    watcher: Watcher
    director: Director = field(default_factory=shared_director)

    def publish(self, state: DesiredState, *, signer: Director | None = None) -> None:
        payload = (signer or self.director).sign(state)

        async def send() -> None:
            async with controller_client(self.broker, "degraded-publisher") as client:
                await client.publish(DESIRED, payload, qos=1, retain=True)

        self.loop.run_until_complete(send())

    def seen(self, channel: str) -> list[dict[str, Any]]:
        self.loop.run_until_complete(asyncio.sleep(0.01))  # let the watcher's task read
        return [m.json() for m in self.watcher.on(channel)]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen("events") if e["device_id"] == DEVICE and e["kind"] == kind]

    def wait_event(self, kind: str, probe: Callable[[dict[str, Any]], bool] = bool) -> Any:
        def detail() -> str:
            return f"events seen: {[(e['kind'], e['data']) for e in self.seen('events')]}"

        return wait_until(
            lambda: [e for e in self.events(kind) if probe(e)],
            f"a {kind} event",
            within_s=WITHIN_S,
            detail=detail,
        )[-1]

    def wait_report(self, probe: Callable[[dict[str, Any]], bool], what: str) -> Any:
        def detail() -> str:
            reports = self.seen("reported")
            return f"last report: {reports[-1] if reports else None}"

        return wait_until(
            lambda: [r for r in self.seen("reported") if probe(r)],
            what,
            within_s=WITHIN_S,
            detail=detail,
        )[-1]

    @property
    def saved_policy(self) -> Path:
        return self.state_dir / "policy.json"


@pytest.fixture
def world(broker: MosquittoBroker, tmp_path: Path, model_store: Path) -> Iterator[World]:
    authorize(broker, {DEVICE: PASSWORD})
    state_dir = tmp_path / "state"
    write_identity(state_dir, broker, DEVICE, PASSWORD)
    settings = AgentSettings(
        store_dir=model_store,
        models=[],
        fault_injection=True,
        fleet=LinkSettings(
            state_dir=state_dir,
            backoff_initial_s=0.05,
            backoff_max_s=0.3,
            trust_root=shared_director().root_file,
        ),
    )
    loop = asyncio.new_event_loop()
    # Persistent: the broker keeps its session across a restart, so nothing is missed.
    watcher = Watcher(broker, client_id="degraded-watcher", persistent=True)
    loop.run_until_complete(watcher.start())
    try:
        yield World(broker, state_dir, settings, loop, watcher)
    finally:
        loop.run_until_complete(watcher.stop())
        loop.close()


def agent_state(client: TestClient) -> AgentState:
    state = client.app.state.agent  # type: ignore[attr-defined]
    assert isinstance(state, AgentState)
    return state


def applied(client: TestClient, version: int) -> None:
    wait_until(
        lambda: (
            within(lambda: client.get("/v1/fleet").json())["applied_desired_version"] == version
        ),
        f"desired state {version} applied",
        within_s=WITHIN_S,
    )


def enforce_first_policy(world: World, client: TestClient) -> FallbackPolicy:
    """Desired state 2 carries policy v2: enforced, announced, reported and saved."""
    good = policy(2)
    world.publish(desired(2, good))
    applied(client, 2)
    digest = policy_digest(good)
    assert digest == good.ref().digest
    assert enforced_digest(client) == digest
    event = world.wait_event("policy_applied", lambda e: e["data"]["version"] == 2)
    assert event["data"] == {"name": "edge-default", "version": 2, "digest": digest}
    report = world.wait_report(
        lambda r: r.get("desired_version") == 2 and (r.get("policy") or {}).get("digest") == digest,
        "a report enforcing policy v2",
    )
    assert report["policy"] == {"name": "edge-default", "version": 2, "digest": digest}
    assert report["degraded"] == []
    saved = FallbackPolicy.model_validate_json(world.saved_policy.read_bytes())
    assert saved == good
    assert policy_digest(saved) == digest
    return good


def enforced_digest(client: TestClient) -> str | None:
    ref = agent_state(client).degraded.ref()
    return ref.digest if ref is not None else None


def test_a_signed_policy_is_enforced_reported_and_saved(world: World) -> None:
    with TestClient(create_app(world.settings)) as client:
        good = enforce_first_policy(world, client)
        assert not world.events("policy_rejected")
        assert not world.events("desired_rejected")
        assert agent_state(client).degraded.policy == good


def test_a_forged_desired_state_does_not_change_the_policy(world: World, tmp_path: Path) -> None:
    rogue = make_director(tmp_path / "rogue")  # a fleet this device does not trust
    with TestClient(create_app(world.settings)) as client:
        good = enforce_first_policy(world, client)
        world.publish(desired(3, policy(3, name="forged")), signer=rogue)
        event = world.wait_event("desired_rejected")
        assert event["severity"] == "error"
        assert event["data"]["reason"] == "SignatureRejected"
        # A correctly signed state published after it shows the forged one was skipped.
        world.publish(desired(3, good))
        applied(client, 3)
        assert enforced_digest(client) == policy_digest(good)
        assert [e["data"]["version"] for e in world.events("policy_applied")] == [2]
        assert FallbackPolicy.model_validate_json(world.saved_policy.read_bytes()) == good
        report = world.wait_report(lambda r: r.get("desired_version") == 3, "a report of state 3")
        assert report["policy"]["digest"] == policy_digest(good)


def test_a_replayed_older_desired_state_does_not_bring_back_its_policy(world: World) -> None:
    older = policy(1, name="edge-old")
    with TestClient(create_app(world.settings)) as client:
        good = enforce_first_policy(world, client)
        world.publish(desired(1, older))  # validly signed, but older than state 2
        event = world.wait_event("desired_rejected")
        assert event["data"]["reason"] == "ReplayedState"
        assert within(lambda: client.get("/v1/fleet").json())["applied_desired_version"] == 2
        assert enforced_digest(client) == policy_digest(good)
        assert agent_state(client).degraded.policy == good
        assert FallbackPolicy.model_validate_json(world.saved_policy.read_bytes()) == good
        assert [e["data"]["version"] for e in world.events("policy_applied")] == [2]


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        pytest.param(
            lambda p: p["breaker"].update(minimum_calls=10, sliding_window=5),
            "minimum_calls (10) cannot exceed sliding_window (5)",
            id="minimum-calls-over-window",
        ),
        pytest.param(
            lambda p: p["chains"][GEMMA]["tiers"][0].update(kind="teleport"),
            "teleport",
            id="teleport-tier",
        ),
    ],
)
def test_a_malformed_policy_is_refused_and_the_rest_of_the_state_acted_on(
    world: World, breakage: Callable[[dict[str, Any]], None], says: str
) -> None:
    with TestClient(create_app(world.settings)) as client:
        good = enforce_first_policy(world, client)
        bad = policy(3).model_dump(mode="json")
        breakage(bad)
        world.publish(desired(3, bad, models=["minilm"]))
        event = world.wait_event("policy_rejected")
        assert event["severity"] == "error"
        assert says in event["data"]["reason"]
        assert event["data"]["desired_version"] == 3
        assert "keeping edge-default v2" in event["message"]
        # The models part of state 3 is acted on: MiniLM is loaded and reported.
        applied(client, 3)
        wait_until(
            lambda: "minilm" in within(lambda: client.get("/readyz").json())["models"],
            "minilm served",
            within_s=WITHIN_S,
        )
        digest = policy_digest(good)
        assert enforced_digest(client) == digest
        report = world.wait_report(
            lambda r: (
                r.get("desired_version") == 3
                and any(m["name"] == "minilm" and m["state"] == "ready" for m in r["models"])
            ),
            "a report of state 3 with minilm ready",
        )
        assert report["policy"] == {"name": "edge-default", "version": 2, "digest": digest}
        assert report["converged"]
        assert FallbackPolicy.model_validate_json(world.saved_policy.read_bytes()) == good
        emb = within(lambda: client.post("/v1/embeddings", json={"model": "minilm", "input": "hi"}))
        assert emb.status_code == 200
    assert [e["data"]["version"] for e in world.events("policy_applied")] == [2]

    # The saved desired state 3 carries the malformed policy: a restart without the
    # broker must still enforce the last good one, not the configuration's (none).
    world.broker.stop()
    with TestClient(create_app(world.settings)) as client:
        assert within(lambda: client.get("/v1/fleet").json())["applied_desired_version"] == 3
        assert enforced_digest(client) == digest


def chat(client: TestClient, text: str, **extra: Any) -> Reply:
    body = {"model": GEMMA, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return within(lambda: client.post("/v1/chat/completions", json={**body, **extra}))


def assert_fallback(response: Reply, answer: str, *, reason: str = "") -> None:
    assert response.status_code == 200, response.text
    assert response.headers["X-Edgefleet-Served-By"] == "rules"
    assert response.headers["X-Edgefleet-Degraded"] == "true"
    body = response.json()
    assert body["choices"][0]["message"]["content"] == answer
    mark = body["edgefleet"]
    assert mark["served_by"] == "rules"
    assert mark["tier"] == "rules"
    assert mark["degraded"] is True
    assert reason in mark["reason"]
    assert mark["reason"] == response.headers["X-Edgefleet-Degraded-Reason"]


def test_the_fallback_answers_while_the_broker_is_down_and_the_breaker_event_follows(
    world: World,
) -> None:
    with TestClient(create_app(world.settings)) as client:
        good = policy(2)
        world.publish(desired(2, good, models=[GEMMA]))
        applied(client, 2)
        wait_until(
            lambda: GEMMA in within(lambda: client.get("/readyz").json())["models"],
            "Gemma served",
            within_s=REQUEST_S,
        )
        world.wait_event("policy_applied")
        healthy = chat(client, "Say hello.")
        assert healthy.status_code == 200, healthy.text
        assert healthy.headers["X-Edgefleet-Served-By"] == GEMMA
        assert healthy.headers["X-Edgefleet-Degraded"] == "false"
        assert healthy.json()["edgefleet"] == {
            "served_by": GEMMA,
            "tier": "primary",
            "degraded": False,
        }

        world.broker.stop()
        wait_until(
            lambda: not within(lambda: client.get("/v1/fleet").json())["connected"],
            "the link to notice the broker is gone",
            within_s=WITHIN_S,
        )
        fault = within(lambda: client.put(f"/v1/faults/{GEMMA}", json={"error_rate": 1.0}))
        assert fault.status_code == 200, fault.text

        # The failing primary is tried twice (each answered by the rules), then skipped.
        first = chat(client, "My router is down, what now?")
        assert_fallback(first, ROUTER, reason=GEMMA)
        second = chat(client, "Tell me a story.")
        assert_fallback(second, f"{RESTING} (policy v2)", reason=GEMMA)
        third = chat(client, "Anything at all?")
        assert_fallback(third, f"{RESTING} (policy v2)", reason="breaker open")
        streamed = within(
            lambda: client.post(
                "/v1/chat/completions",
                json={
                    "model": GEMMA,
                    "messages": [{"role": "user", "content": "router again"}],
                    "max_tokens": 4,
                    "stream": True,
                },
            )
        )
        assert streamed.status_code == 200
        assert streamed.headers["X-Edgefleet-Served-By"] == "rules"
        assert streamed.headers["X-Edgefleet-Degraded"] == "true"
        assert "Unplug the router" in streamed.text
        breakers = {b.model: b.state.value for b in agent_state(client).degraded.breakers()}
        assert breakers[GEMMA] == "open"
        readyz = within(lambda: client.get("/readyz"))
        assert readyz.status_code == 200
        assert readyz.json()["status"] == "degraded"
        assert readyz.json()["degraded"][0]["model"] == GEMMA
        offline = within(lambda: client.get("/v1/fleet").json())
        assert not offline["connected"]
        assert not world.events("breaker_opened")  # nothing can have reached the broker

        world.broker.start()
        event = world.wait_event("breaker_opened")
        assert event["severity"] == "warning"
        assert event["data"]["model"] == GEMMA
        assert event["data"]["kind"] == "error"
        assert event["data"]["to"] == "open"
        report = world.wait_report(
            lambda r: any(d["name"] == GEMMA for d in r.get("degraded", [])),
            "a report listing Gemma as degraded",
        )
        (degraded,) = report["degraded"]
        assert degraded["breaker"] == "open"
        assert degraded["kind"] == "error"
        assert report["policy"]["digest"] == policy_digest(good)
        assert within(lambda: client.get("/v1/fleet").json())["connected"]


def test_a_restart_without_the_broker_enforces_the_saved_policy(world: World) -> None:
    # "ghost" is not in the store: it fails to load, and its chain answers for it.
    good = policy(2, model="ghost")
    with TestClient(create_app(world.settings)) as client:
        world.publish(desired(2, good, models=["ghost"]))
        applied(client, 2)
        world.wait_event("policy_applied")
        assert enforced_digest(client) == policy_digest(good)
    assert json.loads(world.saved_policy.read_text())["chains"]["ghost"]

    world.broker.stop()
    with TestClient(create_app(world.settings)) as client:
        fleet = within(lambda: client.get("/v1/fleet").json())
        assert not fleet["connected"]
        assert fleet["applied_desired_version"] == 2
        assert enforced_digest(client) == policy_digest(good)
        assert agent_state(client).degraded.policy == good
        readyz = wait_until(
            lambda: (
                (r := within(lambda: client.get("/readyz"))).json().get("status") == "degraded"
                and r
            ),
            "/readyz degraded: ghost failed, its chain covers it",
            within_s=WITHIN_S,
        )
        assert readyz.status_code == 200
        assert readyz.json()["degraded"][0]["model"] == "ghost"
        answer = within(
            lambda: client.post(
                "/v1/chat/completions",
                json={"model": "ghost", "messages": [{"role": "user", "content": "router?"}]},
            )
        )
        assert_fallback(answer, ROUTER, reason="ghost")
