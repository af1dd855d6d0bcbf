"""``edgefleet-agent status``: the steps from boot.json, /readyz over real HTTP, the exit code."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.boot_status import BootRecorder, Step
from agent.cli import app as cli
from agent.status_report import (
    ApiAnswer,
    BootFile,
    exit_code,
    probe_api,
    read_boot,
    readyz_url,
    render,
    report,
)
from scripts.servers import free_port

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Readyz:
    """A local API stand-in: answers GET /readyz with whatever the test sets."""

    def __init__(self) -> None:
        self.status_code = 200
        self.body: dict[str, Any] = {"status": "ready", "models": ["gemma3-270m"]}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = json.dumps(owner.body).encode()
                self.send_response(owner.status_code if self.path == "/readyz" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def api() -> Iterator[Readyz]:
    readyz = Readyz()
    readyz.thread.start()
    yield readyz
    readyz.server.shutdown()
    readyz.server.server_close()
    readyz.thread.join(5)


def recorded(path: Path | None = None) -> BootRecorder:
    clock = iter(T0 + timedelta(seconds=i) for i in range(100))
    recorder = BootRecorder(path, clock=lambda: next(clock), pid=4321)
    recorder.finish(Step.PROVISIONED, "fleet https://fleet.example:8000, with an enrollment token")
    recorder.finish(Step.DEVICE_KEY, "/var/lib/edgefleet/agent/device.key")
    recorder.trouble(
        Step.ENROLLED,
        "controller unreachable at https://fleet.example:8000: connection refused; "
        "retrying in 30 s",
        final=False,
    )
    recorder.finish(Step.MODELS, "serving gemma3-270m")
    recorder.finish(Step.SERVING, "the API serves gemma3-270m")
    return recorder


def test_wildcard_binds_are_asked_on_loopback() -> None:
    assert readyz_url("0.0.0.0", 8080) == "http://127.0.0.1:8080/readyz"
    assert readyz_url("::", 8080) == "http://[::1]:8080/readyz"
    assert readyz_url("::1", 81) == "http://[::1]:81/readyz"
    assert readyz_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/readyz"
    assert readyz_url("jetson.local", 8080) == "http://jetson.local:8080/readyz"


def test_the_text_shows_every_step_the_current_one_and_why() -> None:
    boot = BootFile(Path("/var/lib/edgefleet/agent/boot.json"), recorded().status)
    answer = ApiAnswer("http://127.0.0.1:8080/readyz", 200, "ready", "serving gemma3-270m")
    lines = render(boot, answer)
    text = "\n".join(lines)
    assert lines[0].startswith("agent started 2026-05-01 12:00:00 UTC (pid 4321)")
    assert "  ✓ provisioned    fleet https://fleet.example:8000" in text
    assert "  ✓ device key     /var/lib/edgefleet/agent/device.key" in text
    assert "  … enrolled       " in text
    assert "(last try: controller unreachable at https://fleet.example:8000" in text
    assert "  · desired state  not started" in text
    assert "  ✓ serving        the API serves gemma3-270m" in text
    assert "current step: enrolled (active)" in lines
    assert any(line.startswith("why: controller unreachable at") for line in lines)
    assert not any(line.startswith("last error:") for line in lines)  # the same as why
    later = recorded()
    later.trouble(Step.SERVING, "broker lost", final=False)  # done steps stay done
    lines = render(BootFile(boot.path, later.status), answer)
    assert "last error: broker lost [2026-05-01 12:00:06 UTC]" in lines
    assert "local API: http://127.0.0.1:8080/readyz answered 200 (ready): serving gemma3-270m" in (
        lines
    )
    assert lines[-1] == "serving"
    assert exit_code(answer) == 0


def test_a_failed_step_shows_a_cross_and_no_answer_means_not_serving() -> None:
    recorder = BootRecorder(None)
    recorder.finish(Step.PROVISIONED)
    recorder.finish(Step.DEVICE_KEY)
    recorder.trouble(
        Step.ENROLLED, "enrollment refused by https://f (HTTP 403): used up", final=True
    )
    answer = ApiAnswer("http://127.0.0.1:8080/readyz", detail="connection refused")
    lines = render(BootFile(Path("boot.json"), recorder.status), answer)
    assert any(
        line.startswith("  ✗ enrolled       enrollment refused by https://f") for line in lines
    )
    assert "current step: enrolled (failed)" in lines
    assert lines[-2].startswith("local API: no answer from http://127.0.0.1:8080/readyz")
    assert lines[-1] == "not serving"
    assert exit_code(answer) == 1


def test_json_for_machines() -> None:
    boot = BootFile(Path("/state/boot.json"), recorded().status)
    answer = ApiAnswer("http://127.0.0.1:8080/readyz", 503, "loading", "loading gemma3-270m")
    data = json.loads(json.dumps(report(boot, answer)))
    assert data["serving"] is False
    assert data["current_step"] == "enrolled"
    assert data["stuck"].startswith("controller unreachable at https://fleet.example:8000")
    assert data["boot"]["steps"]["serving"]["state"] == "done"
    assert data["api"] == {
        "url": "http://127.0.0.1:8080/readyz",
        "status_code": 503,
        "status": "loading",
        "detail": "loading gemma3-270m",
    }


def test_reading_boot_json(tmp_path: Path) -> None:
    missing = read_boot(tmp_path / "boot.json")
    assert missing.status is None
    assert "has not started yet" in str(missing.problem)
    (tmp_path / "boot.json").write_text("garbage")
    assert "not a boot status file" in str(read_boot(tmp_path / "boot.json").problem)
    recorded(tmp_path / "boot.json")
    assert read_boot(tmp_path / "boot.json").status == recorded().status.model_copy(
        update={"pid": 4321}
    )


def test_probing_readyz_over_http(api: Readyz) -> None:
    url = f"http://127.0.0.1:{api.port}/readyz"
    assert probe_api(url) == ApiAnswer(url, 200, "ready", "serving gemma3-270m")
    api.status_code, api.body = 503, {"status": "loading", "loading": ["gemma3-270m"]}
    assert probe_api(url) == ApiAnswer(url, 503, "loading", "loading gemma3-270m")
    api.body = {"status": "failed", "failed": {"minilm": "corrupt"}, "loading": []}
    assert probe_api(url).detail == "failed minilm: corrupt"
    closed = f"http://127.0.0.1:{free_port()}/readyz"
    assert probe_api(closed) == ApiAnswer(closed, detail="connection refused")


def write_config(tmp_path: Path, port: int) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'port = {port}\n[fleet]\nstate_dir = "{state}"\n')
    return config


def test_the_status_command_exits_0_only_while_the_api_serves(api: Readyz, tmp_path: Path) -> None:
    config = write_config(tmp_path, api.port)
    recorded(tmp_path / "state" / "boot.json")
    result = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "current step: enrolled (active)" in result.output
    assert result.output.rstrip().endswith("serving")

    api.status_code, api.body = 503, {"status": "loading", "loading": ["gemma3-270m"]}
    result = CliRunner().invoke(cli, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["serving"] is False
    assert data["api"]["status"] == "loading"


def test_the_status_command_without_an_agent(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert result.exit_code == 1
    assert "has not started yet" in result.output
    assert "no answer from" in result.output
