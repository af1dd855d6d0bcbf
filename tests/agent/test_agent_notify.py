"""A real agent process under a stand-in for systemd: READY, STATUS, WATCHDOG, STOPPING.

The agent runs ``edgefleet-agent serve`` with the real bundled models, ``NOTIFY_SOCKET``
pointing at a real AF_UNIX datagram socket (abstract) and a watchdog, as the unit runs it.
It also checks the promise first boot relies on: a device that cannot reach its fleet
still serves the models baked into its config, and ``edgefleet-agent status`` says why
enrollment is stuck.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli import app as cli
from scripts.servers import free_port
from tests.agent.notify_support import NotifySocket
from tests.conftest import start_agent

pytestmark = pytest.mark.integration  # real agent processes and the real models

MODELS = [{"name": "gemma3-270m"}, {"name": "minilm"}]
WATCHDOG_USEC = "4000000"  # 4 s: a ping every 2 s


def test_ready_comes_once_the_models_serve_then_pings_then_stopping(
    tmp_path: Path, model_store: Path
) -> None:
    state_dir = tmp_path / "state"
    with NotifySocket() as systemd:
        agent = start_agent(
            tmp_path,
            model_store,
            settings={"fleet": {"state_dir": state_dir}},
            models=MODELS,
            wait=False,
            env={"NOTIFY_SOCKET": systemd.env, "WATCHDOG_USEC": WATCHDOG_USEC},
        )
        try:
            ready = systemd.wait_for("READY", "1", within_s=180)
            answer = httpx.get(f"{agent.url}/readyz", timeout=5)  # at once: it must serve
            assert answer.status_code == 200, answer.text
            assert answer.json()["models"] == ["gemma3-270m", "minilm"]
            assert ready["STATUS"] == "serving gemma3-270m, minilm"
            statuses = [m["STATUS"] for m in systemd.seen if "STATUS" in m]
            assert any(s.startswith("models: active: loading gemma3-270m") for s in statuses)
            for _ in range(2):
                systemd.wait_for("WATCHDOG", "1", within_s=10)

            result = CliRunner().invoke(cli, ["status", "--config", str(agent.config)])
            assert result.exit_code == 0, result.output
            assert "current step: none, every step is done" in result.output
            boot = json.loads((state_dir / "boot.json").read_text())
            assert boot["pid"] == agent.proc.pid
            assert boot["steps"]["provisioned"]["state"] == "skipped"  # no fleet

            agent.proc.send_signal(signal.SIGTERM)
            systemd.wait_for("STOPPING", "1", within_s=20)
        finally:
            agent.stop()


def test_a_device_that_cannot_reach_its_fleet_serves_its_baked_in_models(
    tmp_path: Path, model_store: Path
) -> None:
    fleet = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    state_dir = tmp_path / "state"
    with NotifySocket() as systemd:
        agent = start_agent(
            tmp_path,
            model_store,
            settings={"fleet": {"state_dir": state_dir, "url": fleet, "token": "eft_baked"}},
            models=[{"name": "minilm"}],
            wait=False,
            env={"NOTIFY_SOCKET": systemd.env},
        )
        try:
            ready = systemd.wait_for("READY", "1", within_s=120)
            assert ready["STATUS"].startswith("serving; enrolled: active: controller unreachable")
            embedded = httpx.post(
                f"{agent.url}/v1/embeddings", json={"model": "minilm", "input": "hi"}, timeout=30
            )
            assert embedded.status_code == 200, embedded.text

            result = CliRunner().invoke(cli, ["status", "--config", str(agent.config), "--json"])
            assert result.exit_code == 0, result.output
            report = json.loads(result.output)
            assert report["serving"] is True
            assert report["current_step"] == "enrolled"
            assert report["stuck"].startswith(f"controller unreachable at {fleet}: connection")
            steps = report["boot"]["steps"]
            assert steps["provisioned"]["state"] == "done"
            assert steps["device_key"]["state"] == "done"
            assert steps["models"]["detail"] == "serving minilm"
        finally:
            agent.stop()
