"""Open Inference Protocol routes, on a tiny real ONNX graph and on the bundled MiniLM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from pydantic import SecretStr
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from agent.api.deps import get_state
from agent.api.kserve import router
from agent.catalog import bundled_minilm
from agent.errors import AgentError
from agent.runtime.onnx import OnnxEmbedder, load_onnx
from agent.serving.registry import ModelRegistry
from models.manifest import ModelManifest, RuntimeParams
from tests.fakes.models import FakeModel

TABLE = np.array([[9, 9], [0, 1], [1, 0], [3, 4]], dtype=np.float32)  # [PAD], [UNK], a, b
VOCAB = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}


def manifest(name: str = "tiny", version: str = "2.1") -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        format="onnx",
        file="model.onnx",
        sha256="0" * 64,
        size_bytes=1,
        runtime=RuntimeParams(max_input_tokens=8),
    )


def tiny_model(tmp_path: Path) -> OnnxEmbedder:
    """input_ids (+ attention_mask * 0) -> Gather(TABLE): rows are checkable by eye."""
    dyn = ["batch", "seq"]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["m", "zero"], ["m0"]),
            helper.make_node("Unsqueeze", ["m0", "axis"], ["m3"]),
            helper.make_node("Add", ["emb", "m3"], ["last_hidden_state"]),
            helper.make_node("Cast", ["attention_mask"], ["mask_out"], to=TensorProto.INT32),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, dyn),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dyn),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dyn, 2]),
            helper.make_tensor_value_info("mask_out", TensorProto.INT32, dyn),
        ],
        [
            numpy_helper.from_array(TABLE, "table"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    tokenizer = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return load_onnx(tmp_path / "model.onnx", manifest(), tmp_path / "tokenizer.json")


def make_client(registry: ModelRegistry, api_keys: list[SecretStr] | None = None) -> TestClient:
    app = FastAPI()
    app.include_router(router)

    @app.exception_handler(AgentError)
    async def agent_error(_: Request, exc: AgentError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    state = SimpleNamespace(registry=registry, settings=SimpleNamespace(api_keys=api_keys or []))
    app.dependency_overrides[get_state] = lambda: state
    return TestClient(app)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    reg = ModelRegistry()
    reg.publish("tiny", tiny_model(tmp_path))
    yield reg
    reg.close()


@pytest.fixture
def client(registry: ModelRegistry) -> TestClient:
    return make_client(registry)


def tensor(name: str, shape: list[int], datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def ids_request(ids: list[list[int]], **extra: Any) -> dict[str, Any]:
    shape = [len(ids), len(ids[0])]
    flat = [i for row in ids for i in row]
    return {
        "inputs": [
            tensor("input_ids", shape, "INT64", flat),
            tensor("attention_mask", shape, "INT64", [1] * len(flat)),
        ],
        **extra,
    }


def assert_error(response: Any, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert fragment in body["error"]


# --- metadata and readiness ----------------------------------------------------------


def test_metadata_describes_the_graph(client: TestClient) -> None:
    response = client.get("/v2/models/tiny")
    assert response.status_code == 200
    assert response.json() == {
        "name": "tiny",
        "versions": ["2.1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [
            {"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 2]},
            {"name": "mask_out", "datatype": "INT32", "shape": [-1, -1]},
        ],
    }


def test_ready_when_served(client: TestClient) -> None:
    response = client.get("/v2/models/tiny/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "tiny", "ready": True}


def test_loading_model_is_503_and_unknown_is_404(registry: ModelRegistry) -> None:
    registry.expect("later")
    client = make_client(registry)
    assert_error(client.get("/v2/models/later/ready"), 503, "still loading")
    assert_error(client.post("/v2/models/later/infer", json=ids_request([[2]])), 503, "loading")
    assert_error(client.get("/v2/models/nope"), 404, "'nope' does not exist")
    assert_error(client.get("/v2/models/nope/ready"), 404, "does not exist")


def test_a_model_without_tensors_is_refused(registry: ModelRegistry) -> None:
    registry.publish("chat", FakeModel(manifest("chat")))  # served, but without tensors
    assert_error(make_client(registry).get("/v2/models/chat"), 400, "does not support")


def test_api_key_is_required_when_configured(registry: ModelRegistry) -> None:
    client = make_client(registry, [SecretStr("s3cret")])
    assert_error(client.get("/v2/models/tiny"), 401, "Missing API key")
    assert_error(
        client.get("/v2/models/tiny", headers={"Authorization": "Bearer wrong"}), 401, "Incorrect"
    )
    ok = client.get("/v2/models/tiny", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


# --- inference -----------------------------------------------------------------------


def test_infer_returns_every_output_flattened(client: TestClient) -> None:
    response = client.post("/v2/models/tiny/infer", json=ids_request([[2, 3]], id="req-7"))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model_name": "tiny",
        "model_version": "2.1",
        "id": "req-7",
        "outputs": [
            {
                "name": "last_hidden_state",
                "shape": [1, 2, 2],
                "datatype": "FP32",
                "data": [1.0, 0.0, 3.0, 4.0],
            },
            {"name": "mask_out", "shape": [1, 2], "datatype": "INT32", "data": [1, 1]},
        ],
    }


def test_infer_returns_only_requested_outputs_and_no_id_unless_sent(client: TestClient) -> None:
    body = ids_request([[3], [2]], outputs=[{"name": "mask_out"}])
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert "id" not in payload
    assert payload["outputs"] == [
        {"name": "mask_out", "shape": [2, 1], "datatype": "INT32", "data": [1, 1]}
    ]


def test_nested_data_is_accepted_row_major(client: TestClient) -> None:
    body = {
        "inputs": [
            tensor("input_ids", [1, 3], "INT64", [[3, 2, 1]]),
            tensor("attention_mask", [1, 3], "INT64", [[1, 1, 1]]),
        ],
        "outputs": [{"name": "last_hidden_state"}],
    }
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [3.0, 4.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (ids_request([[2]], outputs=[{"name": "logits"}]), 400, "unknown outputs ['logits']"),
        (
            {"inputs": [tensor("input_ids", [1, 2], "INT64", [2])]},
            400,
            "has shape [1, 2], so it needs 2 values, got 1",
        ),
        ({"inputs": [tensor("input_ids", [1], "FP8", [2])]}, 400, "inputs.0.datatype"),
        ({"inputs": [tensor("input_ids", [-1], "INT64", [2])]}, 400, "inputs.0.shape.0"),
        ({"inputs": []}, 400, "inputs"),
        ({"inputs": [tensor("input_ids", [1], "INT64", [1.5])]}, 400, "must be a valid INT64"),
        ({"inputs": [tensor("input_ids", [1], "INT64", [True])]}, 400, "must be a valid INT64"),
        ({"inputs": [tensor("x", [1], "INT8", [300])]}, 400, "out of range for INT8"),
        ({"inputs": [tensor("x", [1], "FP16", [1e10])]}, 400, "out of range for FP16"),
        ({"inputs": [tensor("x", [1], "FP32", ["1"])]}, 400, "must be a valid FP32"),
        (
            {
                "inputs": [
                    tensor("input_ids", [1, 1], "INT32", [2]),
                    tensor("attention_mask", [1, 1], "INT64", [1]),
                ]
            },
            400,
            "'input_ids' must be INT64",
        ),
        (
            {
                "inputs": [
                    tensor("input_ids", [2], "INT64", [2, 2]),
                    tensor("attention_mask", [2], "INT64", [1, 1]),
                ]
            },
            400,
            "'input_ids' must have rank 2",
        ),
        (
            {
                "inputs": [
                    tensor("input_ids", [1, 1], "INT64", [2]),
                    tensor("input_ids", [1, 1], "INT64", [2]),
                ]
            },
            400,
            "only once",
        ),
        (ids_request([[2, 50]]), 400, "ONNX Runtime rejected"),
    ],
    ids=[
        "unknown-output",
        "count",
        "datatype",
        "negative-shape",
        "no-inputs",
        "float-for-int",
        "bool-for-int",
        "int-overflow",
        "fp16-overflow",
        "string-for-float",
        "graph-dtype",
        "graph-rank",
        "duplicate",
        "runtime",
    ],
)
def test_bad_requests_are_400_with_a_reason(
    client: TestClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    assert_error(client.post("/v2/models/tiny/infer", json=body), status, fragment)


def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v2/models/tiny/infer", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid inference request")


def test_text_input_embeds_strings(client: TestClient, registry: ModelRegistry) -> None:
    body = {"id": "e1", "inputs": [tensor("text", [2], "BYTES", ["b", "a b zebra"])]}
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    [out] = response.json()["outputs"]
    assert out["name"] == "embedding"
    assert out["datatype"] == "FP32"
    assert out["shape"] == [2, 2]
    # "b" -> [3, 4] / 5; "a b zebra" -> mean([1,0],[3,4],[0,1]) = [4/3, 5/3] normalised.
    expected = np.array([[0.6, 0.8], np.array([4.0, 5.0]) / np.hypot(4.0, 5.0)])
    np.testing.assert_allclose(np.reshape(out["data"], (2, 2)), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("text_tensor", "outputs", "fragment"),
    [
        (tensor("text", [1], "INT64", [1]), None, "must be BYTES with shape [n]"),
        (tensor("text", [1, 1], "BYTES", ["a"]), None, "must be BYTES with shape [n]"),
        (tensor("text", [2], "BYTES", ["a"]), None, "needs 2 values, got 1"),
        (tensor("text", [0], "BYTES", []), None, "at least one text"),
        (tensor("text", [1], "BYTES", ["a"]), [{"name": "logits"}], "one output, 'embedding'"),
    ],
    ids=["datatype", "rank", "count", "empty", "output"],
)
def test_bad_text_requests(
    client: TestClient,
    text_tensor: dict[str, Any],
    outputs: list[dict[str, str]] | None,
    fragment: str,
) -> None:
    body: dict[str, Any] = {"inputs": [text_tensor]}
    if outputs is not None:
        body["outputs"] = outputs
    assert_error(client.post("/v2/models/tiny/infer", json=body), 400, fragment)


def test_infer_on_a_retired_model_finishes_then_closes(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """Swapping the model mid-flight must not break requests; the old one closes after."""
    old = registry.models()[0]
    assert isinstance(old, OnnxEmbedder)
    replacement_dir = tmp_path / "v2"
    replacement_dir.mkdir()
    registry.publish("tiny", tiny_model(replacement_dir))
    client = make_client(registry)
    assert client.post("/v2/models/tiny/infer", json=ids_request([[2]])).status_code == 200
    with pytest.raises(AgentError, match="unloaded"):
        old.infer({"input_ids": np.array([[2]]), "attention_mask": np.array([[1]])})


# --- the real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_client() -> Iterator[tuple[TestClient, OnnxEmbedder]]:
    model_path, tokenizer_path = bundled_minilm()
    real = ModelManifest(
        name="minilm",
        version="1.0.0",
        format="onnx",
        file=model_path.name,
        sha256="0" * 64,
        size_bytes=model_path.stat().st_size,
        runtime=RuntimeParams(max_input_tokens=256, embedding_dim=384),
    )
    registry = ModelRegistry()
    model = load_onnx(model_path, real, tokenizer_path)
    registry.publish("minilm", model)
    yield make_client(registry), model
    registry.close()


@pytest.mark.integration
def test_minilm_text_round_trip(minilm_client: tuple[TestClient, OnnxEmbedder]) -> None:
    client, model = minilm_client
    texts = ["A man is eating food.", "A man is riding a horse."]
    body = {"id": "x", "inputs": [tensor("text", [2], "BYTES", texts)]}
    response = client.post("/v2/models/minilm/infer", json=body)
    assert response.status_code == 200, response.text
    [out] = response.json()["outputs"]
    assert out["shape"] == [2, 384]
    vectors = np.array(out["data"], dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(vectors, model.embed(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.integration
def test_minilm_raw_tensor_round_trip(minilm_client: tuple[TestClient, OnnxEmbedder]) -> None:
    client, _ = minilm_client
    meta = client.get("/v2/models/minilm").json()
    names = [i["name"] for i in meta["inputs"]]
    assert "input_ids" in names
    assert all(i["datatype"] == "INT64" for i in meta["inputs"])
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    body = {
        "inputs": [
            tensor(
                n,
                [1, 4],
                "INT64",
                ids
                if n == "input_ids"
                else [1, 1, 1, 1]
                if n == "attention_mask"
                else [0, 0, 0, 0],
            )
            for n in names
        ]
    }
    response = client.post("/v2/models/minilm/infer", json=body)
    assert response.status_code == 200, response.text
    first = response.json()["outputs"][0]
    assert first["datatype"] == "FP32"
    assert first["shape"][:2] == [1, 4]
    assert first["shape"][-1] == 384
    assert np.isfinite(first["data"]).all()


def test_openapi_documents_the_infer_body_without_dangling_refs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    inputs = body["content"]["application/json"]["schema"]["properties"]["inputs"]
    assert inputs["items"]["properties"]["datatype"]["enum"][-1] == "BYTES"
    assert "$defs" not in str(body)
