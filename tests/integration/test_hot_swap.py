"""SIGHUP reconciles the served models; a swap never cuts an in-flight stream."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from agent.store import ModelStore
from tests.conftest import start_agent
from tests.polling import wait_until

pytestmark = pytest.mark.integration

LLM = "gemma3-270m"


def context_per_slot(url: str) -> int | None:
    models = httpx.get(f"{url}/v1/device").json()["models"]
    details = [m for m in models if m["name"] == LLM]
    return details[0]["details"].get("context_per_slot") if details else None


def test_sighup_swaps_a_model_while_a_stream_finishes_on_the_old_one(
    tmp_path: Path, model_store: Path
) -> None:
    runtime = {"context_length": 1024, "parallel_slots": 2, "chat_template": "gemma"}
    agent = start_agent(
        tmp_path, model_store, models=[{"name": LLM, "runtime": runtime}, {"name": "minilm"}]
    )
    try:
        assert context_per_slot(agent.url) == 1024
        body = {
            "model": LLM,
            "prompt": "A long story:",
            "max_tokens": 160,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        started = threading.Event()
        outcome: dict[str, object] = {}

        def stream() -> None:
            chunks = 0
            with httpx.stream("POST", f"{agent.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        started.set()
                    elif line == "data: [DONE]":
                        outcome["done"] = True
            outcome["chunks"] = chunks

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        agent.reconfigure(
            model_store, [{"name": LLM, "runtime": {**runtime, "context_length": 512}}]
        )
        wait_until(
            lambda: context_per_slot(agent.url) == 512,
            "the new model live (512 tokens of context per slot)",
            every_s=0.1,
        )
        reader.join(120)
        assert outcome.get("done") is True
        assert outcome["chunks"] >= 160  # every token arrived from the model it started on
        names = [m["id"] for m in httpx.get(f"{agent.url}/v1/models").json()["data"]]
        assert names == [LLM]  # minilm was removed from the config and unloaded
        again = httpx.post(
            f"{agent.url}/v1/completions", json={"model": LLM, "prompt": "hi", "max_tokens": 3}
        )
        assert again.status_code == 200
    finally:
        agent.stop()


def test_sighup_with_a_broken_config_keeps_serving(tmp_path: Path, model_store: Path) -> None:
    agent = start_agent(tmp_path, model_store, models=[{"name": "minilm"}])
    try:
        agent.config.write_text("this is = not [valid toml")
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for_output("keeping the current models")
        assert_still_embedding(agent.url, "minilm")
    finally:
        agent.stop()


def test_a_swap_to_a_broken_file_keeps_serving_the_previous_model(
    tmp_path: Path, model_store: Path
) -> None:
    runtime = {"tokenizer": "tokenizer.json", "embedding_dim": 384}
    good = ModelStore(model_store).resolve("minilm")[1]  # the active slot's file
    agent = start_agent(
        tmp_path, model_store, models=[{"name": "emb", "path": str(good), "runtime": runtime}]
    )
    try:
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"\x00not an onnx graph" * 64)
        agent.reconfigure(model_store, [{"name": "emb", "path": str(broken), "runtime": runtime}])
        agent.wait_for_output("emb failed to load")
        assert_still_embedding(agent.url, "emb")
    finally:
        agent.stop()


def test_sighup_naming_a_missing_file_keeps_the_model_served(
    tmp_path: Path, model_store: Path
) -> None:
    agent = start_agent(tmp_path, model_store, models=[{"name": "minilm"}])
    try:
        agent.reconfigure(model_store, [{"name": "minilm", "path": str(tmp_path / "gone.onnx")}])
        agent.wait_for_output("minilm cannot be resolved")
        assert_still_embedding(agent.url, "minilm")
    finally:
        agent.stop()


def assert_still_embedding(url: str, model: str) -> None:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "still here"}, timeout=30)
    assert r.status_code == 200
    assert len(r.json()["data"][0]["embedding"]) == 384
    assert httpx.get(f"{url}/readyz").status_code == 200
