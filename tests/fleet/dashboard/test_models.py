"""The models pages: the registry's versions and variants, what they need, whether TUF signed
them, the model card, which devices run what, and the TUF roles' expiries.
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet.alerts.params import TufExpiryParams
from fleet.api.schemas import ArtifactPublic, ModelMetadata
from fleet.dashboard.views.models import requirements_of, role_views, signature_of
from fleet.registry.repository import RoleStatus
from models.manifest import ModelFormat
from tests.fleet.dashboard.conftest import Browser
from tests.fleet.helpers import Clock
from tests.fleet.rollout_world import GB, World

GGUF = b"GGUF" + bytes(range(256)) * 40  # starts like a GGUF file
NOW = datetime(2031, 5, 6, tzinfo=UTC)


def artifact(**fields: Any) -> ArtifactPublic:
    values: dict[str, Any] = {
        "name": "gemma3",
        "version": "2.0",
        "variant": "Q4_K_M",
        "format": ModelFormat.GGUF,
        "sha256": "a" * 64,
        "size_bytes": 1000,
        "metadata": ModelMetadata(),
        "created_at": NOW,
        "yanked": False,
        "yanked_at": None,
        "yank_reason": "",
        "download_url": "https://fleet.example.com/x",
    }
    return ArtifactPublic(**(values | fields))


def test_signature_is_read_from_the_published_and_staged_targets() -> None:
    path = "gemma3/2.0/Q4_K_M.gguf"
    nowhere, staged = (lambda _p: False), (lambda p: p == path)
    assert signature_of(artifact(), {path: "a" * 64}, nowhere) == "signed"
    assert signature_of(artifact(), {path: "b" * 64}, nowhere) == "mismatch"
    assert signature_of(artifact(), {}, staged) == "staged"
    assert signature_of(artifact(), {}, nowhere) == "unsigned"
    assert signature_of(artifact(variant="Q8_0"), {path: "a" * 64}, nowhere) == "unsigned"


def test_requirements_are_said_in_words() -> None:
    meta = ModelMetadata.model_validate(
        {
            "ram_bytes": 2 * GB,
            "vram_bytes": 3 * GB,
            "requirements": {
                "gpu": "required",
                "arch": ["aarch64"],
                "min_compute_capability": "8.7",
                "min_l4t": "36.0",
                "runtimes": {"onnxruntime": "1.20"},
            },
        }
    )
    assert requirements_of(artifact(metadata=meta)) == [
        "RAM 2.0 GiB (on CPU)",
        "GPU memory 3.0 GiB (all layers offloaded)",
        "GPU required",
        "arch aarch64",
        "compute capability ≥ 8.7",
        "L4T ≥ 36.0",
        "onnxruntime ≥ 1.20",
    ]
    assert requirements_of(artifact()) == []


def test_roles_warn_at_the_expiry_alerts_threshold_not_before() -> None:
    def role(name: str, days: float | None) -> RoleStatus:
        expires = None if days is None else NOW + timedelta(days=days)
        return RoleStatus(name, 1, expires, ("k1", "k2"), 1, ("k1",))

    thresholds = TufExpiryParams()  # root and targets 30 days, snapshot 2, timestamp 0.25
    views = role_views(
        [
            role("root", 300),
            role("targets", 20),
            role("snapshot", 3),
            role("timestamp", 0.5),  # as it always is, half a day after its renewal
            role("director", None),
        ],
        NOW,
        thresholds.days,
    )
    assert [(v.role, v.state, v.left) for v in views] == [
        ("root", "ok", "300 days"),
        ("targets", "soon", "20 days"),
        ("snapshot", "ok", "3 days"),
        ("timestamp", "ok", "12 h"),
        ("director", "ok", None),
    ]
    assert (views[0].keys, views[0].online) == (2, 1)
    late = role_views([role("timestamp", 0.1), role("snapshot", -1)], NOW, thresholds.days)
    assert [(v.state, v.left) for v in late] == [("soon", "2 h"), ("expired", "0 min")]


# --- the pages ----------------------------------------------------------------------------


def upload(api: TestClient, version: str, variant: str, **metadata: Any) -> None:
    answer = api.post(
        f"/api/v1/models/gemma3/versions/{version}",
        params={"variant": variant, "format": "gguf"},
        content=GGUF + version.encode() + variant.encode(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Edgefleet-Metadata": json.dumps(metadata),
        },
    )
    assert answer.status_code == 201, answer.text


@pytest.fixture
def registry(api: TestClient, engine: Engine, clock: Clock) -> World:
    """gemma3 1.0 and 2.0 uploaded (signed), 2.1 inserted behind TUF's back; devices on them."""
    upload(api, "1.0", "Q4_K_M", ram_bytes=GB, licence="gemma")
    upload(
        api,
        "2.0",
        "Q4_K_M",
        ram_bytes=GB,
        card="# Gemma 3 <script>alert(1)</script>\nSmall and quick.",
    )
    upload(api, "2.0", "Q8_0", ram_bytes=2 * GB, requirements={"arch": ["x86_64"]})
    world = World(engine, clock=clock)
    world.artifact("2.1")  # a row with no TUF target: never signed
    world.device("dev-one")  # serves 1.0
    world.device("dev-two")
    world.device("dev-old")
    world.report("dev-old", "0.9", "c" * 64)  # a version the registry never held
    world.serve_also("dev-two", "minilm")  # bundled with the agent, not in the registry
    return world


def test_the_model_list_shows_versions_devices_and_tuf_roles(
    browser: Browser, registry: World
) -> None:
    page = browser.get("/ui/models")
    assert page.status_code == 200, page.text
    gemma = re.search(r'<tr data-model="gemma3">(.*?)</tr>', page.text, re.S)
    assert gemma is not None
    assert "<td>2.1</td>" in gemma.group(1)  # the newest upload
    assert '<a href="/ui/devices?model=gemma3">3</a>' in gemma.group(1)
    minilm = re.search(r'<tr data-model="minilm">(.*?)</tr>', page.text, re.S)
    assert minilm is not None
    assert "not in the registry" in minilm.group(1)
    for role in ("root", "targets", "snapshot", "timestamp", "director"):
        assert f'<tr data-role="{role}">' in page.text
    timestamp = re.search(r'<tr data-role="timestamp">(.*?)</tr>', page.text, re.S)
    assert timestamp is not None
    assert 'class="badge ok">24 h left' in timestamp.group(1)  # renewed daily: no warning


def variant_row(text: str, version: str, variant: str) -> str:
    start = text.index(f'id="version-{version}"')
    found = re.search(rf'<tr data-variant="{variant}"[^>]*>(.*?)</tr>', text[start:], re.S)
    assert found is not None, (version, variant)
    return found.group(1)


def test_a_model_page_shows_variants_signatures_cards_and_devices(
    browser: Browser, registry: World
) -> None:
    page = browser.get("/ui/models/gemma3")
    assert page.status_code == 200, page.text
    text = page.text
    order = [text.index(f'id="version-{v}"') for v in ("2.1", "2.0", "1.0")]
    assert order == sorted(order)  # newest upload first
    assert 'data-signature="signed"' in variant_row(text, "2.0", "Q4_K_M")
    q8 = variant_row(text, "2.0", "Q8_0")
    assert 'data-signature="signed"' in q8
    assert "RAM 2.0 GiB (on CPU); arch x86_64" in q8
    assert 'data-signature="unsigned"' in variant_row(text, "2.1", "Q4_K_M")
    assert "gemma" in variant_row(text, "1.0", "Q4_K_M")  # the licence
    # The card is text: its markup is shown, never run.
    assert "# Gemma 3 &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert" not in text
    one = text[text.index('id="version-1.0"') :]
    assert '<a href="/ui/devices?model=gemma3%401.0" data-devices="2">2 devices</a>' in one
    assert (
        'data-devices="0"' in text[text.index('id="version-2.0"') : text.index('id="version-1.0"')]
    )
    others = text[text.index('id="unregistered-versions"') :]
    assert 'href="/ui/devices?model=gemma3%400.9"' in others
    assert '<a href="/ui/devices?model=gemma3">3 devices run it</a>' in text


def test_a_model_only_devices_know_still_has_a_page(browser: Browser, registry: World) -> None:
    page = browser.get("/ui/models/minilm")
    assert page.status_code == 200
    assert "Not in the registry" in page.text
    assert "1 device runs it" in page.text


@pytest.mark.parametrize("name", ["nothing-here", "Not%20A%20Name"])
def test_an_unknown_model_is_a_404_page(browser: Browser, name: str) -> None:
    page = browser.get(f"/ui/models/{name}")
    assert page.status_code == 404
    assert "<html" in page.text
    assert "no model" in html.unescape(page.text)


def test_an_empty_registry_says_how_to_fill_it(browser: Browser) -> None:
    page = browser.get("/ui/models")
    assert "No model has been uploaded yet" in page.text
    assert '<tr data-role="root">' in page.text


def test_a_viewer_sees_the_models(browser_as: Any, registry: World) -> None:
    vera = browser_as("vera")
    assert vera.get("/ui/models").status_code == 200
    assert vera.get("/ui/models/gemma3").status_code == 200
