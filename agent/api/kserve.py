"""Open Inference Protocol (KServe v2) routes for tensor models.

- ``GET  /v2/models/{name}``        metadata: versions, platform, input and output tensors
- ``GET  /v2/models/{name}/ready``  200 once the model serves, 503 while it loads
- ``POST /v2/models/{name}/infer``  named tensors in, named tensors out (JSON, row-major)

Convenience beyond the protocol: a request whose only input is a ``BYTES``
tensor named ``text`` with shape ``[n]`` (and which the graph does not itself
take) means "embed these n strings"; the answer is one ``FP32`` output named
``embedding`` with shape ``[n, dim]``, mean-pooled and L2-normalised as
``/v1/embeddings`` would return it.

Every failure is an :mod:`agent.errors` exception, including a body that does
not parse, so the app's handler answers ``{"error": "..."}`` as the protocol
asks instead of FastAPI's own 422 format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Annotated, Any, Final, Literal

import anyio.to_thread
import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.api.deps import AgentState, Authorized, StateDep
from agent.errors import AgentError, InvalidRequest
from agent.runtime.base import Embedder, TensorSpec

__all__ = [
    "InferInputTensor",
    "InferOutputTensor",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ModelReady",
    "RequestedOutput",
    "TensorMetadata",
    "router",
]

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

TEXT_INPUT: Final = "text"
EMBEDDING_OUTPUT: Final = "embedding"

ModelPath = Annotated[str, Path(description="the model's name, as the agent serves it")]


class TensorMetadata(BaseModel):
    """One graph input or output; ``-1`` marks a dimension the graph leaves open."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """Answer to ``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    """Answer to ``GET /v2/models/{name}/ready``."""

    name: str
    ready: bool


class InferInputTensor(BaseModel):
    """A request tensor; ``data`` is row-major, flat or nested."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    """An output the client wants back; the others are left out of the response."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """Body of ``POST /v2/models/{name}/infer``."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    """A response tensor, always flattened row-major."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    """Answer to ``POST /v2/models/{name}/infer``; ``id`` echoes the request's."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$defs`` so the schema stands alone inside an OpenAPI operation."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_INFER_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_refs(InferRequest.model_json_schema())}},
    }
}


def _lease(state: AgentState, name: str) -> AbstractContextManager[Embedder]:
    return state.registry.lease(name, Embedder)


router = APIRouter(prefix="/v2", tags=["open-inference-protocol"], dependencies=[Authorized])


@router.get("/models/{name}", response_model=ModelMetadata)
def model_metadata(name: ModelPath, state: StateDep) -> ModelMetadata:
    """Describe the graph's tensors so OIP clients can build requests."""
    with _lease(state, name) as model:
        return ModelMetadata(
            name=name,
            versions=[model.manifest.version],
            platform="onnxruntime_onnx",
            inputs=[_tensor_metadata(s) for s in model.inputs],
            outputs=[_tensor_metadata(s) for s in model.outputs],
        )


@router.get("/models/{name}/ready", response_model=ModelReady)
def model_ready(name: ModelPath, state: StateDep) -> ModelReady:
    """Answer 200 only if a request now would be served; the registry raises 503 or 404."""
    with _lease(state, name):
        return ModelReady(name=name, ready=True)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    response_model_exclude_none=True,
    openapi_extra=_INFER_BODY,
)
async def infer(name: ModelPath, request: Request, state: StateDep) -> InferResponse:
    """Run the model on the request's tensors, or embed its ``text`` strings."""
    body = await _parse(request)
    with _lease(state, name) as model:
        # Conversion and serialisation are CPU work too: all of it leaves the event loop.
        outputs = await anyio.to_thread.run_sync(partial(_run, model, body))
        return InferResponse(
            model_name=name, model_version=model.manifest.version, id=body.id, outputs=outputs
        )


def _run(model: Embedder, body: InferRequest) -> list[InferOutputTensor]:
    if _is_text_request(body, {s.name for s in model.inputs}):
        results = _embed_text(model, body)
    else:
        arrays = {t.name: _to_array(t) for t in body.inputs}
        if len(arrays) != len(body.inputs):
            raise InvalidRequest("each input name may appear only once")
        results = _select(model.infer(arrays), body.outputs)
    return [_to_output(n, a) for n, a in results.items()]


async def _parse(request: Request) -> InferRequest:
    raw = await request.body()
    try:
        return InferRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(
            f"invalid inference request at {where}: {first['msg']}"
            + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
        ) from exc


def _is_text_request(body: InferRequest, graph_inputs: set[str]) -> bool:
    return (
        TEXT_INPUT not in graph_inputs
        and len(body.inputs) == 1
        and body.inputs[0].name == TEXT_INPUT
    )


def _embed_text(model: Embedder, body: InferRequest) -> dict[str, npt.NDArray[Any]]:
    tensor = body.inputs[0]
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise InvalidRequest(
            f"input {TEXT_INPUT!r} must be BYTES with shape [n], "
            f"got {tensor.datatype} {tensor.shape}"
        )
    texts = _flatten(tensor.data)
    _check_count(tensor, texts)
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest(f"input {TEXT_INPUT!r} must hold strings")
    wanted = [o.name for o in body.outputs or []]
    if any(n != EMBEDDING_OUTPUT for n in wanted):
        raise InvalidRequest(f"a {TEXT_INPUT!r} request has one output, {EMBEDDING_OUTPUT!r}")
    return {EMBEDDING_OUTPUT: model.embed(texts)}


def _flatten(data: Sequence[Any]) -> list[Any]:
    def walk(node: Any) -> Iterator[Any]:
        if isinstance(node, list):
            for item in node:
                yield from walk(item)
        else:
            yield node

    return list(walk(list(data)))


def _check_count(tensor: InferInputTensor, flat: Sequence[Any]) -> None:
    expected = math.prod(tensor.shape)
    if len(flat) != expected:
        raise InvalidRequest(
            f"input {tensor.name!r} has shape {tensor.shape}, so it needs {expected} "
            f"values, got {len(flat)}"
        )


def _to_array(tensor: InferInputTensor) -> npt.NDArray[Any]:
    """Convert exactly or refuse: numpy alone would turn 1.5 into 1 for an INT64 input."""
    flat = _flatten(tensor.data)
    _check_count(tensor, flat)
    kind = tensor.datatype
    if kind == "BOOL":
        valid = all(isinstance(v, bool) for v in flat)
    elif kind == "BYTES":
        valid = all(isinstance(v, str) for v in flat)
    elif kind.startswith(("INT", "UINT")):
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    else:
        valid = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    if not valid:
        raise InvalidRequest(f"input {tensor.name!r}: every value must be a valid {kind}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = np.array(flat, dtype=_DTYPES[kind])
    except (OverflowError, ValueError, FloatingPointError) as exc:
        raise InvalidRequest(f"input {tensor.name!r}: a value is out of range for {kind}") from exc
    return array.reshape(tensor.shape)


def _select(
    results: Mapping[str, npt.NDArray[Any]], requested: Sequence[RequestedOutput] | None
) -> dict[str, npt.NDArray[Any]]:
    if requested is None:
        return dict(results)
    unknown = sorted({o.name for o in requested} - set(results))
    if unknown:
        raise InvalidRequest(f"unknown outputs {unknown}; the model has {sorted(results)}")
    return {o.name: results[o.name] for o in requested}


def _to_output(name: str, array: npt.NDArray[Any]) -> InferOutputTensor:
    datatype = next((k for k, v in _DTYPES.items() if v == array.dtype), None)
    if datatype is None and array.dtype.kind in "OSU":
        datatype = "BYTES"
    if datatype is None:
        raise AgentError(f"output {name!r} has dtype {array.dtype}, which OIP cannot carry")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise AgentError(f"model produced NaN or infinity in output {name!r}; JSON cannot carry it")
    data: list[Any] = array.reshape(-1).tolist()
    if datatype == "BYTES":
        data = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in data]
    return InferOutputTensor(name=name, shape=list(array.shape), datatype=datatype, data=data)


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
