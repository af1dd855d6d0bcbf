"""A fleet for update tests: a real controller, an enrolled agent, real model variants.

The artifacts are the bundled Gemma GGUF with one metadata string changed (a different
file that llama.cpp loads the same way), a truncated copy (a valid header whose tensor
data is missing) and bytes that only start like a GGUF: the last two are validly
signed once pushed, and must fail the health check.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gguf import GGUFReader

from agent.catalog import BUNDLED
from agent.store import ModelStore
from scripts.servers import Controller, free_port, running_controller
from tests.conftest import AgentProcess, start_agent
from tests.integration.test_fleet_system import EVERY_S, admin, new_token
from tests.polling import wait_until

LLM = "gemma3-270m"
UPDATE_S = 120.0  # seconds: an update of the 253 MB model with its health check, with room


def gguf_variant(source: Path, dest: Path, name: bytes) -> Path:
    """A copy of ``source`` whose ``general.name`` is ``name`` (same length): new bytes."""
    shutil.copyfile(source, dest)
    reader = GGUFReader(dest, "r+")
    field = reader.fields["general.name"]
    value = field.parts[field.data[0]]
    assert len(name) == len(value), f"{name!r} must be {len(value)} bytes"
    value[:] = np.frombuffer(name, dtype=np.uint8)
    reader.data.flush()
    del reader
    return dest


@dataclass(frozen=True)
class Artifacts:
    original: Path
    v11: Path
    v12: Path
    truncated: Path
    garbage: Path


def make_artifacts(folder: Path, model_store: Path) -> Artifacts:
    original = ModelStore(model_store).resolve(LLM)[1]
    truncated = folder / "truncated.gguf"
    with original.open("rb") as f:
        truncated.write_bytes(f.read(8 << 20))
    garbage = folder / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    return Artifacts(
        original=original,
        v11=gguf_variant(original, folder / "gemma-1.1.gguf", b"Gemma 3 27Am"),
        v12=gguf_variant(original, folder / "gemma-1.2.gguf", b"Gemma 3 27Bm"),
        truncated=truncated,
        garbage=garbage,
    )


# What the bundled base model answers greedily, as an admin would record it at push time
# (" the capital of the French Republic. It" with deterministic kernels, " the capital of
# the country of France." with fast ones).
GOLDEN = [{"prompt": "The capital of France is", "expect": "the capital of", "max_tokens": 8}]


@dataclass
class Fleet:
    """A controller, an enrolled agent serving Gemma from its own store, and helpers."""

    controller: Controller
    agent: AgentProcess
    device_id: str
    store: Path
    tmp: Path

    def api(self) -> httpx.Client:
        return admin(self.controller)

    def push(
        self,
        file: Path,
        version: str,
        golden: list[dict[str, Any]] | None = None,
        **metadata: Any,
    ) -> str:
        """Register ``file`` as ``LLM`` ``version`` through the real upload route."""
        metadata.update(
            runtime=BUNDLED[LLM].runtime.model_dump(mode="json"),
            golden_prompts=GOLDEN if golden is None else golden,
        )
        with self.api() as api, file.open("rb") as body:
            response = api.post(
                f"/api/v1/models/{LLM}/versions/{version}",
                params={"format": "gguf", "filename": file.name},
                content=body,
                headers={
                    "X-Edgefleet-Metadata": json.dumps(metadata),
                    "Content-Type": "application/octet-stream",
                },
                timeout=120,
            )
        assert response.status_code in (200, 201), response.text
        return str(response.json()["sha256"])

    def desire(self, version: str) -> int:
        with self.api() as api:
            response = api.put(
                f"/api/v1/devices/{self.device_id}/desired",
                json={"models": [{"name": LLM, "version": version}]},
            )
        assert response.status_code == 202, response.text
        return int(response.json()["version"])

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self.api() as api:
            body = api.get(
                f"/api/v1/devices/{self.device_id}/events",
                params={"kind": kind, "limit": 1000, "since": "2000-01-01T00:00:00Z"},
            )
        assert body.status_code == 200, body.text
        return list(body.json()["items"])

    def reported(self) -> dict[str, Any]:
        with self.api() as api:
            body: dict[str, Any] = api.get(f"/api/v1/devices/{self.device_id}").json()
        return body

    def served(self) -> dict[str, str] | None:
        """Version and sha256 of the Gemma the agent says it serves (GET /v1/models)."""
        try:
            models = httpx.get(f"{self.agent.url}/v1/models", timeout=5).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        for model in models:
            if model["id"] == LLM:
                return {k: str(model["edgefleet"][k]) for k in ("version", "sha256")}
        return None

    def served_version(self) -> str | None:
        served = self.served()
        return served["version"] if served else None

    def chat(self) -> str:
        response = httpx.post(
            f"{self.agent.url}/v1/chat/completions",
            json={
                "model": LLM,
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 4,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    def restart(self, wait: bool = True) -> None:
        self.agent = start_agent(
            self.tmp, self.store, settings=self.agent_settings(), models=[], wait=wait
        )

    def agent_settings(self) -> dict[str, Any]:
        return {
            "fleet": {
                "url": self.controller.url,
                "state_dir": self.tmp / "agent-state",
                "telemetry_interval_s": 2.0,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 2.0,
            }
        }


@contextmanager
def update_fleet(tmp_path: Path, model_store: Path) -> Iterator[Fleet]:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    database = f"sqlite:///{tmp_path / 'fleet.db'}"
    embedded_broker = ("--broker-port", str(free_port()))
    with running_controller(tmp_path, database, *embedded_broker) as controller:
        fleet = Fleet(controller, None, "", store, tmp_path)  # type: ignore[arg-type]
        settings = fleet.agent_settings()
        settings["fleet"]["token"] = new_token(controller)
        fleet.agent = start_agent(tmp_path, store, settings=settings, models=[{"name": LLM}])
        try:
            identity = tmp_path / "agent-state" / "identity.json"
            wait_until(identity.exists, "the agent to enroll", every_s=EVERY_S)
            fleet.device_id = json.loads(identity.read_text())["device_id"]
            wait_until(
                lambda: fleet.reported().get("status") == "online",
                "the device online",
                every_s=EVERY_S,
            )
            yield fleet
        finally:
            fleet.agent.stop()
