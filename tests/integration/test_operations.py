"""Health, readiness, metrics, the device probe, API keys, the interaction log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import AGENT_BIN, AgentProcess, free_port, start_agent

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"


def test_health_readiness_and_kserve_ready(agent: AgentProcess) -> None:
    assert httpx.get(f"{agent.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{agent.url}/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["models"]) == {LLM, "minilm"}
    assert httpx.get(f"{agent.url}/v2/models/minilm/ready").json()["ready"] is True


def test_metrics_expose_what_operators_need(agent: AgentProcess) -> None:
    httpx.post(
        f"{agent.url}/v1/completions",
        json={"model": LLM, "prompt": "metrics", "max_tokens": 3},
        timeout=60,
    )
    text = httpx.get(f"{agent.url}/metrics").text
    for name in (
        "edgefleet_requests_total",
        "edgefleet_request_duration_seconds_bucket",
        "edgefleet_time_to_first_token_seconds_bucket",
        "edgefleet_decode_tokens_per_second_bucket",
        "edgefleet_queue_depth",
        "edgefleet_active_slots",
        "edgefleet_rejections_total",
        "edgefleet_response_cache_total",
        "edgefleet_model_load_seconds",
        "edgefleet_model_memory_bytes",
        "edgefleet_process_resident_bytes",
    ):
        assert name in text, name
    assert f'edgefleet_requests_total{{endpoint="completions",model="{LLM}",status="200"}}' in text


def test_device_reports_what_the_probe_found_and_where_models_run(agent: AgentProcess) -> None:
    body = httpx.get(f"{agent.url}/v1/device").json()
    device = body["device"]
    assert device["cpu_logical_cores"] >= 1
    assert device["ram_total_bytes"] > 0
    assert "llama_cpp" in device["runtimes"]
    assert "onnxruntime" in device["runtimes"]
    models = {m["name"]: m for m in body["models"]}
    assert models[LLM]["runtime"] == "llama.cpp"
    assert models[LLM]["device"] == "cpu"
    assert models["minilm"]["provider"] == "CPUExecutionProvider"
    assert models[LLM]["memory_bytes"] > 200 * 2**20


@pytest.fixture(scope="module")
def keyed_agent(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> AgentProcess:
    tmp = tmp_path_factory.mktemp("keyed")
    proc = start_agent(
        tmp,
        model_store,
        settings={"api_keys": ["s3cret-key"], "log": {"path": str(tmp / "interactions.jsonl")}},
        models=[{"name": "minilm"}],
    )
    yield proc  # type: ignore[misc]
    proc.stop()


def test_api_key_is_required_when_configured(keyed_agent: AgentProcess) -> None:
    url = keyed_agent.url
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert (
        httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    )
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["minilm"]


def test_interaction_log_records_metadata_without_bodies(
    keyed_agent: AgentProcess, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=f"{keyed_agent.url}/v1", api_key="s3cret-key", max_retries=0)
    client.embeddings.create(model="minilm", input="secret text about alice@example.com")
    log_path = Path(keyed_agent.config).parent / "interactions.jsonl"
    assert log_path.exists()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    entry = lines[-1]
    assert entry["endpoint"] == "embeddings"
    assert entry["model"] == "minilm"
    assert entry["status"] == 200
    assert entry["prompt_tokens"] > 0
    assert "prompt" not in entry
    assert "alice@example.com" not in log_path.read_text()


def test_binding_beyond_loopback_without_a_key_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(AGENT_BIN), "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def test_serve_with_a_missing_model_file_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(AGENT_BIN),
            "serve",
            "--model",
            str(tmp_path / "missing.gguf"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_a_corrupt_model_fails_readiness_with_the_reason(tmp_path: Path, model_store: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    proc = start_agent(
        tmp_path, model_store, models=[{"name": "broken", "path": str(bad)}], wait=False
    )
    try:
        body = proc.readiness("failed")
        assert "not a GGUF file" in body["failed"]["broken"]
        chat = httpx.post(f"{proc.url}/v1/completions", json={"model": "broken", "prompt": "x"})
        assert chat.status_code == 503
        assert "failed to load" in chat.json()["error"]["message"]
    finally:
        proc.stop()


def test_a_model_over_the_memory_budget_is_refused_with_the_reason(
    tmp_path: Path, model_store: Path
) -> None:
    proc = start_agent(
        tmp_path,
        model_store,
        settings={"memory_budget_mb": 100},
        models=[{"name": "minilm"}, {"name": LLM}],
        wait=False,
    )
    try:
        body = proc.readiness("failed")
        assert "memory budget" in body["failed"][LLM]
        assert body["models"] == ["minilm"]  # the model that fits is served
    finally:
        proc.stop()
