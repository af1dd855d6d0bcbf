"""The model registry: the content-addressed store, the upload API, device downloads, the CLI.

API tests run on SQLite and PostgreSQL (through ``api``); store tests need no database.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.api.limits import MAX_BODY_BYTES
from fleet.config import FleetSettings
from fleet.errors import InvalidInput, TooLarge
from fleet.registry.store import ArtifactStore, check_digest
from fleet.registry.targets import describe_target
from fleet.tables import ModelArtifact
from tests.fleet.helpers import Clock, enroll, error

GGUF = b"GGUF" + bytes(range(256)) * 40  # 10,244 bytes that start like a GGUF file
ONNX = b"\x08\x07\x12\x07pytorch" + b"\x00" * 500  # protobuf: no magic number
MODELS = "/api/v1/models"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(
    api: TestClient,
    data: bytes,
    name: str = "gemma3-270m",
    version: str = "1.0.0",
    *,
    metadata: dict[str, Any] | None = None,
    **params: str,
) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if metadata is not None:
        headers["X-Edgefleet-Metadata"] = json.dumps(metadata)
    return api.post(
        f"{MODELS}/{name}/versions/{version}", content=data, params=params, headers=headers
    )


def uploaded(api: TestClient, data: bytes = GGUF, **kw: Any) -> dict[str, Any]:
    response = upload(api, data, **kw)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def basic(device_id: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{device_id}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def device_auth(api: TestClient, clock: Clock) -> tuple[str, dict[str, str]]:
    body = enroll(api, clock)
    return body["device_id"], basic(body["broker"]["username"], body["broker"]["password"])


# --- the store ------------------------------------------------------------------------------


def test_store_ingests_hashes_and_lays_files_out_by_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    stored = store.ingest_sync([GGUF[:100], GGUF[100:]])
    assert (stored.sha256, stored.size, stored.new) == (sha(GGUF), len(GGUF), True)
    path = tmp_path / "artifacts" / "sha256" / sha(GGUF)[:2] / sha(GGUF)
    assert store.path(stored.sha256) == path
    assert path.read_bytes() == GGUF
    assert store.has(stored.sha256)
    assert list((tmp_path / "artifacts" / "tmp").iterdir()) == []  # no temporary file left


def test_store_deduplicates_identical_content(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first = store.ingest_sync([GGUF])
    again = asyncio.run(store.ingest(_chunks(GGUF, 7)))
    assert again.sha256 == first.sha256
    assert not again.new
    assert [p.name for p in (tmp_path / "sha256").rglob("*") if p.is_file()] == [sha(GGUF)]


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_store_async_ingest_matches_one_pass_hash_over_many_writes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000  # 5 MB: several buffered writes
    stored = asyncio.run(ArtifactStore(tmp_path).ingest(_chunks(data, 65_536)))
    assert stored.sha256 == sha(data)
    assert ArtifactStore(tmp_path).path(stored.sha256).read_bytes() == data


def test_store_refusing_the_first_bytes_or_the_size_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_bytes=1000)

    def refuse(head: bytes) -> None:
        raise InvalidInput(f"no: {head[:4]!r}")

    with pytest.raises(InvalidInput):
        asyncio.run(store.ingest(_chunks(GGUF, 100), on_first=refuse))
    with pytest.raises(TooLarge):
        asyncio.run(store.ingest(_chunks(GGUF, 100)))
    with pytest.raises(TooLarge):
        store.ingest_sync([GGUF])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "digest",
    [
        "../../etc/passwd",
        "A" * 64,  # upper case: one spelling per digest
        "0" * 63,
        "0" * 65,
        "0" * 62 + "/x",
        "g" * 64,
        "",
    ],
)
def test_only_hex_digests_map_to_paths(tmp_path: Path, digest: str) -> None:
    with pytest.raises(InvalidInput):
        ArtifactStore(tmp_path).path(digest)
    with pytest.raises(InvalidInput):
        check_digest(digest)


def test_target_description_is_the_seam_for_signing() -> None:
    target = describe_target(
        name="m",
        version="1",
        variant="Q4_K_M",
        fmt="gguf",
        sha256=sha(GGUF),
        size_bytes=len(GGUF),
        metadata={"card": "long text", "licence": "apache-2.0", "ram_bytes": None},
    )
    assert target.path == "m/1/Q4_K_M.gguf"
    assert target.hashes == {"sha256": sha(GGUF)}
    assert target.length == len(GGUF)
    assert target.custom == {
        "licence": "apache-2.0",
        "name": "m",
        "version": "1",
        "variant": "Q4_K_M",
        "format": "gguf",
    }


# --- upload, list, show ---------------------------------------------------------------------


def test_upload_then_list_and_show(api: TestClient, settings: FleetSettings) -> None:
    meta = {
        "quantization": "Q4_K_M",
        "ram_bytes": 400_000_000,
        "context_length": 32768,
        "runtime": {"context_length": 4096, "parallel_slots": 4},
        "golden_prompts": [{"prompt": "2+2=", "expect": "4"}],
        "licence": "gemma",
    }
    body = uploaded(api, metadata=meta, variant="Q4_K_M")
    assert body["sha256"] == sha(GGUF)
    assert body["size_bytes"] == len(GGUF)
    assert body["format"] == "gguf"
    assert body["variant"] == "Q4_K_M"
    assert body["metadata"]["runtime"]["parallel_slots"] == 4
    assert body["metadata"]["golden_prompts"] == [
        {"prompt": "2+2=", "expect": "4", "max_tokens": 32}
    ]
    assert body["yanked"] is False
    assert body["download_url"] == f"https://fleet.example.com/api/v1/artifacts/{sha(GGUF)}"
    stored = settings.resolved_artifact_dir / "sha256" / sha(GGUF)[:2] / sha(GGUF)
    assert stored.read_bytes() == GGUF

    uploaded(api, GGUF + b"v2", version="1.1.0", variant="Q4_K_M")
    uploaded(api, GGUF + b"q8", version="1.1.0", variant="Q8_0")
    uploaded(api, ONNX, name="minilm", version="2024.1", filename="model.onnx")

    listing = api.get(MODELS).json()
    assert [
        (m["name"], m["latest_version"], m["latest_variants"], m["versions"]) for m in listing
    ] == [
        ("gemma3-270m", "1.1.0", ["Q4_K_M", "Q8_0"], 2),
        ("minilm", "2024.1", ["default"], 1),
    ]
    versions = api.get(f"{MODELS}/gemma3-270m").json()
    assert [v["version"] for v in versions] == ["1.1.0", "1.0.0"]
    assert [a["variant"] for a in versions[0]["artifacts"]] == ["Q4_K_M", "Q8_0"]
    one = api.get(f"{MODELS}/minilm/versions/2024.1").json()
    assert one["artifacts"][0]["format"] == "onnx"
    assert error(api.get(f"{MODELS}/nope"))[:2] == (404, "not_found")
    assert error(api.get(f"{MODELS}/minilm/versions/9"))[:2] == (404, "not_found")


@pytest.mark.usefixtures("permissive_umask")
def test_a_stored_artifact_is_owner_only(api: TestClient, settings: FleetSettings) -> None:
    uploaded(api)
    blob = settings.resolved_artifact_dir / "sha256" / sha(GGUF)[:2] / sha(GGUF)
    assert blob.read_bytes() == GGUF
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600


def test_upload_needs_the_admin_token(api: TestClient) -> None:
    response = api.post(
        f"{MODELS}/m/versions/1",
        content=GGUF,
        headers={"Authorization": "", "Content-Type": "application/octet-stream"},
    )
    assert error(response)[:2] == (401, "unauthorized")
    assert error(api.get(MODELS, headers={"Authorization": ""}))[:2] == (401, "unauthorized")


def test_upload_larger_than_the_json_body_limit_streams(api: TestClient) -> None:
    data = b"GGUF" + b"\x01" * (MAX_BODY_BYTES * 3)
    body = uploaded(api, data)
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == sha(data)
    # ...while every other route keeps the limit.
    assert error(api.post("/api/v1/groups", content=b"x" * (MAX_BODY_BYTES + 1)))[0] == 413


def test_identical_reupload_is_idempotent(api: TestClient) -> None:
    first = uploaded(api, metadata={"licence": "mit"})
    again = upload(api, GGUF, metadata={"licence": "mit"})
    assert again.status_code == 200, again.text
    assert again.json() == first


def test_reupload_of_a_row_stored_before_new_metadata_fields_is_idempotent(
    api: TestClient, engine: Engine
) -> None:
    """A row from before ``requirements`` and ``quality`` existed lacks them; it is the same."""
    first = uploaded(api)
    with Session(engine) as session:
        row = session.exec(select(ModelArtifact)).one()
        row.meta = {k: v for k, v in row.meta.items() if k not in {"requirements", "quality"}}
        session.add(row)
        session.commit()
    again = upload(api, GGUF)
    assert again.status_code == 200, again.text
    assert again.json()["sha256"] == first["sha256"]


def test_conflicting_reupload_is_refused(api: TestClient) -> None:
    uploaded(api, metadata={"licence": "mit"})
    other = upload(api, GGUF + b"changed")
    status, code, message = error(other)
    assert (status, code) == (409, "conflict")
    assert sha(GGUF) in message
    same_length = upload(api, b"GGUF" + b"\xff" * (len(GGUF) - 4))  # only the hash tells
    assert error(same_length)[:2] == (409, "conflict")
    other_meta = upload(api, GGUF, metadata={"licence": "apache-2.0"})
    assert error(other_meta)[:2] == (409, "conflict")
    assert api.get(f"{MODELS}/gemma3-270m").json()[0]["artifacts"][0]["sha256"] == sha(GGUF)


@pytest.mark.parametrize(
    ("data", "params", "headers", "fragment"),
    [
        (ONNX, {}, {}, "cannot tell the file's format"),
        (ONNX, {"format": "gguf"}, {}, "not a GGUF file"),
        (GGUF, {"format": "onnx"}, {}, "is GGUF"),
        (b"", {}, {}, "empty"),
        (GGUF, {}, {"X-Edgefleet-Metadata": "{not json"}, "X-Edgefleet-Metadata"),
        (GGUF, {}, {"X-Edgefleet-Metadata": '{"ram": 1}'}, "X-Edgefleet-Metadata"),
        (GGUF, {}, {"Content-Type": "multipart/form-data"}, "application/octet-stream"),
        (GGUF, {"variant": "../x"}, {}, "variant"),
    ],
)
def test_bad_uploads_are_refused_and_store_nothing(
    api: TestClient,
    settings: FleetSettings,
    data: bytes,
    params: dict[str, str],
    headers: dict[str, str],
    fragment: str,
) -> None:
    sent = {"Content-Type": "application/octet-stream", **headers}
    response = api.post(f"{MODELS}/m/versions/1", content=data, params=params, headers=sent)
    status, code, message = error(response)
    assert (status, code) == (422, "invalid_input")
    assert fragment in message
    blobs = settings.resolved_artifact_dir / "sha256"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    assert api.get(MODELS).json() == []


def test_bad_names_in_the_path_are_refused(api: TestClient) -> None:
    assert error(upload(api, GGUF, name="Upper"))[:2] == (422, "invalid_input")
    assert error(upload(api, GGUF, version="-1"))[:2] == (422, "invalid_input")


def test_yank_keeps_the_version_but_not_as_latest(api: TestClient, clock: Clock) -> None:
    uploaded(api, version="1.0.0")
    clock.advance(minutes=1)
    uploaded(api, GGUF + b"2", version="1.1.0")
    yanked = api.post(f"{MODELS}/gemma3-270m/versions/1.1.0/yank", json={"reason": "bad output"})
    assert yanked.status_code == 200, yanked.text
    body = yanked.json()
    assert body["yanked"] is True
    assert body["artifacts"][0]["yank_reason"] == "bad output"
    assert body["artifacts"][0]["yanked_at"].startswith("2031-05-06T07:09:09")
    assert api.get(MODELS).json()[0]["latest_version"] == "1.0.0"

    clock.advance(minutes=1)
    again = api.post(f"{MODELS}/gemma3-270m/versions/1.1.0/yank", json={"reason": "other"})
    assert again.json()["artifacts"][0]["yank_reason"] == "bad output"  # the first one stays

    api.post(f"{MODELS}/gemma3-270m/versions/1.0.0/yank", json={"reason": "all bad"})
    summary = api.get(MODELS).json()[0]
    assert (summary["latest_version"], summary["versions"]) == (None, 2)

    missing = api.post(
        f"{MODELS}/gemma3-270m/versions/1.0.0/yank", json={"reason": "x", "variant": "Q8_0"}
    )
    assert error(missing)[:2] == (404, "not_found")
    assert error(api.post(f"{MODELS}/gemma3-270m/versions/1.0.0/yank", json={}))[0] == 422


def test_yank_one_variant(api: TestClient) -> None:
    uploaded(api, variant="Q4_K_M")
    uploaded(api, GGUF + b"8", variant="Q8_0")
    body = api.post(
        f"{MODELS}/gemma3-270m/versions/1.0.0/yank", json={"reason": "slow", "variant": "Q8_0"}
    ).json()
    assert [(a["variant"], a["yanked"]) for a in body["artifacts"]] == [
        ("Q4_K_M", False),
        ("Q8_0", True),
    ]
    assert body["yanked"] is False
    assert api.get(MODELS).json()[0]["latest_variants"] == ["Q4_K_M"]


def test_model_card_has_its_own_route(api: TestClient) -> None:
    uploaded(api)
    card = "# Gemma 3 270M\n\nA small model. ünïcode\n" * 200
    response = api.put(
        f"{MODELS}/gemma3-270m/versions/1.0.0/card",
        content=card.encode(),
        headers={"Content-Type": "text/markdown"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["artifacts"][0]["metadata"]["card"] == card
    # The card is descriptive: re-uploading the same file stays idempotent.
    assert upload(api, GGUF).status_code == 200


# --- device downloads -----------------------------------------------------------------------


def test_a_device_downloads_with_its_broker_credentials(api: TestClient, clock: Clock) -> None:
    body = uploaded(api)
    _device_id, auth = device_auth(api, clock)
    response = api.get(f"/api/v1/artifacts/{body['sha256']}", headers=auth)
    assert response.status_code == 200, response.text
    assert response.content == GGUF
    assert response.headers["etag"] == f'"{sha(GGUF)}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(len(GGUF))
    assert response.headers["x-edgefleet-yanked"] == "false"
    head = api.head(f"/api/v1/artifacts/{body['sha256']}", headers=auth)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(GGUF))


def test_the_admin_token_downloads_too(api: TestClient) -> None:
    body = uploaded(api)
    assert api.get(f"/api/v1/artifacts/{body['sha256']}").content == GGUF


def test_wrong_or_missing_device_credentials_are_401(api: TestClient, clock: Clock) -> None:
    body = uploaded(api)
    device_id, _auth = device_auth(api, clock)
    url = f"/api/v1/artifacts/{body['sha256']}"
    for headers in [
        basic(device_id, "wrong"),
        basic("dev-nobody", "wrong"),
        {"Authorization": "Basic !!!"},
        {"Authorization": ""},
        {"Authorization": "Bearer wrong-token-wrong-token"},
    ]:
        response = api.get(url, headers=headers)
        assert error(response)[:2] == (401, "unauthorized"), headers
    challenge = api.get(url, headers={"Authorization": ""}).headers["www-authenticate"]
    assert challenge.startswith("Basic")


def test_a_revoked_device_is_refused(api: TestClient, clock: Clock) -> None:
    body = uploaded(api)
    device_id, auth = device_auth(api, clock)
    assert api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    response = api.get(f"/api/v1/artifacts/{body['sha256']}", headers=auth)
    assert error(response)[:2] == (403, "forbidden")


def test_unknown_and_malformed_digests(api: TestClient, clock: Clock) -> None:
    _device_id, auth = device_auth(api, clock)
    assert error(api.get(f"/api/v1/artifacts/{'0' * 64}", headers=auth))[:2] == (
        404,
        "not_found",
    )
    assert error(api.get("/api/v1/artifacts/NOTHEX", headers=auth))[:2] == (
        422,
        "invalid_input",
    )
    assert api.get("/api/v1/artifacts/..%2F..%2Fetc%2Fpasswd", headers=auth).status_code in {
        404,
        422,
    }


def test_yanked_artifacts_stay_downloadable_and_say_so(api: TestClient, clock: Clock) -> None:
    body = uploaded(api)
    api.post(f"{MODELS}/gemma3-270m/versions/1.0.0/yank", json={"reason": "rollback only"})
    _device_id, auth = device_auth(api, clock)
    response = api.get(f"/api/v1/artifacts/{body['sha256']}", headers=auth)
    assert response.status_code == 200
    assert response.content == GGUF
    assert response.headers["x-edgefleet-yanked"] == "true"


def test_range_requests_resume_a_download(api: TestClient, clock: Clock) -> None:
    body = uploaded(api)
    _device_id, auth = device_auth(api, clock)
    url = f"/api/v1/artifacts/{body['sha256']}"
    size = len(GGUF)

    part = api.get(url, headers={**auth, "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == GGUF[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"

    rest = api.get(url, headers={**auth, "Range": "bytes=5000-"})
    assert rest.status_code == 206
    assert rest.content == GGUF[5000:]
    assert rest.headers["content-range"] == f"bytes 5000-{size - 1}/{size}"

    tail = api.get(url, headers={**auth, "Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, GGUF[-10:])

    beyond = api.get(url, headers={**auth, "Range": f"bytes={size}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"

    # If-Range with the current ETag resumes; with another one the whole file comes back.
    same = api.get(url, headers={**auth, "Range": "bytes=10-", "If-Range": f'"{sha(GGUF)}"'})
    assert (same.status_code, same.content) == (206, GGUF[10:])
    changed = api.get(url, headers={**auth, "Range": "bytes=10-", "If-Range": '"other"'})
    assert (changed.status_code, changed.content) == (200, GGUF)


# --- the CLI --------------------------------------------------------------------------------


def test_cli_push_list_show_yank_in_process(tmp_path: Path, api: TestClient) -> None:
    from typer.testing import CliRunner

    from fleet.cli import app
    from tests.fleet.helpers import ADMIN_TOKEN

    model = tmp_path / "tiny.Q4_K_M.gguf"
    model.write_bytes(GGUF)
    card = tmp_path / "card.md"
    card.write_text("# Tiny\n")
    metadata = tmp_path / "metadata.json"
    golden = [{"prompt": "2+2=", "expect": "4", "max_tokens": 4}]
    metadata.write_text(json.dumps({"ram_bytes": 300_000_000, "golden_prompts": golden}))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(
            app, [*args, "--admin-token", ADMIN_TOKEN], obj={"http": api}, catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        return result.output

    push = [
        "models", "push", str(model), "--name", "tiny", "--version", "1.0",
        "--variant", "Q4_K_M", "--card", str(card), "--context-length", "2048",
        "--licence", "mit", "--metadata", str(metadata),
    ]  # fmt: skip
    assert f"pushed: tiny 1.0 (Q4_K_M, gguf, 10.0 KiB) sha256 {sha(GGUF)}" in run(*push)
    assert "already registered" in run(*push)
    shown = api.get(f"{MODELS}/tiny/versions/1.0").json()["artifacts"][0]["metadata"]
    assert (shown["card"], shown["licence"], shown["context_length"]) == ("# Tiny\n", "mit", 2048)
    assert shown["quantization"] == "Q4_K_M"
    assert (shown["ram_bytes"], shown["golden_prompts"]) == (300_000_000, golden)
    assert "tiny" in run("models", "list")
    assert sha(GGUF)[:16] in run("models", "show", "tiny")
    assert "yanked tiny 1.0 (Q4_K_M)" in run("models", "yank", "tiny", "1.0", "--reason", "x")
    assert "yes: x" in run("models", "show", "tiny")
    listed = json.loads(run("models", "list", "--json"))
    assert listed[0]["latest_version"] is None

    other = tmp_path / "other.gguf"
    other.write_bytes(GGUF + b"!")
    result = runner.invoke(
        app,
        ["models", "push", str(other), "--name", "tiny", "--version", "1.0", "--variant",
         "Q4_K_M", "--admin-token", ADMIN_TOKEN],
        obj={"http": api},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "other content" in result.output


@pytest.mark.integration
def test_cli_push_to_a_real_controller_and_a_device_resumes_the_download(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from scripts.servers import free_port, running_controller
    from tests.fleet.helpers import DeviceKey

    data = b"GGUF" + bytes(range(256)) * 12_000  # about 3 MiB: over the JSON body limit
    model = tmp_path / "model.gguf"
    model.write_bytes(data)
    database = f"sqlite:///{tmp_path / 'fleet.db'}"
    with running_controller(tmp_path, database, "--broker-port", str(free_port())) as controller:
        out = controller.cli(
            "models", "push", str(model), "--name", "e2e", "--version", "1", "--licence", "mit"
        )
        assert "pushed: e2e 1 (default, gguf" in out
        assert sha(data) in out
        assert "e2e" in controller.cli("models", "list")

        token = json.loads(controller.cli("tokens", "create", "--json"))
        enrolled = httpx.post(
            f"{controller.url}/api/v1/enroll",
            json=DeviceKey().request(token["secret"], datetime.now(UTC), name="e2e-board"),
            timeout=10,
        ).json()
        auth = (enrolled["broker"]["username"], enrolled["broker"]["password"])
        url = f"{controller.url}/api/v1/artifacts/{sha(data)}"
        first = httpx.get(url, auth=auth, headers={"Range": "bytes=0-999999"}, timeout=10)
        assert first.status_code == 206
        rest = httpx.get(url, auth=auth, headers={"Range": "bytes=1000000-"}, timeout=10)
        assert rest.status_code == 206
        assert first.content + rest.content == data
        assert httpx.get(url, auth=(auth[0], "wrong"), timeout=10).status_code == 401
