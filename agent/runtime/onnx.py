"""ONNX Runtime behind the :class:`~agent.runtime.base.Embedder` protocol.

Two ways in: ``embed`` tokenizes text, mean-pools and L2-normalises (sentence
embedders such as all-MiniLM-L6-v2); ``infer`` runs the graph on raw named
tensors for the Open Inference Protocol. Both are blocking: call them from a
worker thread. ONNX Runtime and tokenizers exceptions stop here and leave as
:mod:`agent.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from agent.errors import InvalidRequest, ModelLoadError, ModelNotReady
from agent.runtime.base import RuntimeInfo, TensorSpec
from models.manifest import ModelManifest

__all__ = [
    "PREFERRED_PROVIDERS",
    "OnnxEmbedder",
    "choose_providers",
    "load_onnx",
]

PREFERRED_PROVIDERS: Final = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Best first; ONNX Runtime falls back along the list for nodes a provider cannot run."""

_GPU_PROVIDERS: Final = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})

# ONNX Runtime's type strings, as Open Inference Protocol datatypes and numpy dtypes.
_ORT_TYPES: Final[Mapping[str, tuple[str, np.dtype[Any]]]] = {
    "tensor(bool)": ("BOOL", np.dtype(np.bool_)),
    "tensor(uint8)": ("UINT8", np.dtype(np.uint8)),
    "tensor(uint16)": ("UINT16", np.dtype(np.uint16)),
    "tensor(uint32)": ("UINT32", np.dtype(np.uint32)),
    "tensor(uint64)": ("UINT64", np.dtype(np.uint64)),
    "tensor(int8)": ("INT8", np.dtype(np.int8)),
    "tensor(int16)": ("INT16", np.dtype(np.int16)),
    "tensor(int32)": ("INT32", np.dtype(np.int32)),
    "tensor(int64)": ("INT64", np.dtype(np.int64)),
    "tensor(float16)": ("FP16", np.dtype(np.float16)),
    "tensor(float)": ("FP32", np.dtype(np.float32)),
    "tensor(double)": ("FP64", np.dtype(np.float64)),
    "tensor(string)": ("BYTES", np.dtype(object)),
}

# What a BERT-style text graph may take besides input_ids; anything else cannot be fed from text.
_TEXT_INPUTS: Final = frozenset({"input_ids", "attention_mask", "token_type_ids"})

_EMBED_CHUNK: Final = 64  # texts per session.run: bounds the padded batch's memory


def choose_providers(available: Sequence[str]) -> list[str]:
    """The preferred providers this build of ONNX Runtime has, best first.

    CPU is always appended: without it a GPU build that cannot reach its GPU
    would have nothing to fall back to.
    """
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _device_for(provider: str) -> str:
    return "cuda:0" if provider in _GPU_PROVIDERS else "cpu"


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type, (str(arg.type), np.dtype(object)))[0]
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=str(arg.name), datatype=datatype, shape=shape)


def _numpy_dtype(spec: TensorSpec) -> np.dtype[Any] | None:
    for datatype, dtype in _ORT_TYPES.values():
        if datatype == spec.datatype:
            return dtype
    return None


class OnnxEmbedder:
    """One ONNX Runtime session, with an optional tokenizer for text embedding."""

    def __init__(
        self,
        session: ort.InferenceSession,
        manifest: ModelManifest,
        tokenizer: Tokenizer | None,
        info: RuntimeInfo,
    ) -> None:
        self._session: ort.InferenceSession | None = session
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._info = info
        self._inputs = tuple(_spec(a) for a in session.get_inputs())
        self._outputs = tuple(_spec(a) for a in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    @property
    def manifest(self) -> ModelManifest:
        """The manifest it was loaded with: name, version, runtime limits."""
        return self._manifest

    @property
    def info(self) -> RuntimeInfo:
        """Where the session really runs, read back from ONNX Runtime after loading."""
        return self._info

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        """The graph's inputs; ``-1`` marks a dynamic dimension."""
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        """The graph's outputs, in the order ``infer`` returns them."""
        return self._outputs

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens after truncation, padding excluded: what the model really read."""
        tokenizer = self._require_tokenizer()
        return sum(sum(e.attention_mask) for e in tokenizer.encode_batch(list(texts)))

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Mean-pool over real tokens only, so padding never moves a text's vector."""
        tokenizer = self._require_tokenizer()
        if not texts:
            raise InvalidRequest("nothing to embed: give at least one text", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("every input to embed must be a string", param="input")
        rows = [
            self._embed_chunk(tokenizer, texts[i : i + _EMBED_CHUNK])
            for i in range(0, len(texts), _EMBED_CHUNK)
        ]
        return np.concatenate(rows, axis=0)

    def _embed_chunk(self, tokenizer: Tokenizer, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        encodings = tokenizer.encode_batch(list(texts))
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        tensors = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feed = {spec.name: tensors[spec.name] for spec in self._inputs}
        hidden = self._run(self._output_names[:1], feed)[0].astype(np.float32, copy=False)
        if hidden.ndim == 3:
            weights = mask[:, :, None].astype(np.float32)
            summed = (hidden * weights).sum(axis=1)
            pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
        elif hidden.ndim == 2:
            pooled = hidden
        else:
            raise InvalidRequest(
                f"model {self._manifest.name!r} outputs rank-{hidden.ndim} tensors, "
                "not token or sentence embeddings; use raw tensor inference instead"
            )
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        normalised: npt.NDArray[np.float32] = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return normalised

    def infer(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Check names, dtypes and ranks first: ONNX Runtime's own messages are cryptic."""
        self._check_inputs(inputs)
        results = self._run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session; ONNX Runtime frees its arena when the last reference goes."""
        self._session = None

    def _require_tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise InvalidRequest(
                f"model {self._manifest.name!r} has no tokenizer, so it cannot embed text; "
                "send raw tensors to /v2/models/{name}/infer instead",
                param="model",
            )
        return self._tokenizer

    def _check_inputs(self, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        expected = {s.name: s for s in self._inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InvalidRequest(
                f"model {self._manifest.name!r} takes inputs {sorted(expected)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        for name, array in inputs.items():
            spec = expected[name]
            want = _numpy_dtype(spec)
            ok = (
                array.dtype.kind in "OSU"
                if spec.datatype == "BYTES"
                else want is not None and array.dtype == want
            )
            if not ok:
                raise InvalidRequest(
                    f"input {name!r} must be {spec.datatype}, got numpy {array.dtype}"
                )
            if array.ndim != len(spec.shape):
                raise InvalidRequest(
                    f"input {name!r} must have rank {len(spec.shape)} (shape {list(spec.shape)}), "
                    f"got shape {list(array.shape)}"
                )
            for axis, (want_dim, got_dim) in enumerate(zip(spec.shape, array.shape, strict=True)):
                if want_dim >= 0 and want_dim != got_dim:
                    raise InvalidRequest(
                        f"input {name!r} dimension {axis} must be {want_dim}, got {got_dim}"
                    )

    def _run(self, outputs: list[str], feed: dict[str, npt.NDArray[Any]]) -> list[Any]:
        session = self._session
        if session is None:
            raise ModelNotReady(f"model {self._manifest.name!r} was unloaded; retry")
        try:
            results: list[Any] = session.run(outputs, feed)
        except Exception as exc:  # ONNX Runtime raises pybind11 types without a common base
            raise InvalidRequest(
                f"ONNX Runtime rejected the input for {self._manifest.name!r}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def load_onnx(path: Path, manifest: ModelManifest, tokenizer_path: Path | None) -> OnnxEmbedder:
    """Load the graph on the best provider this machine has; blocking, run it in a thread."""
    started = time.perf_counter()
    if not path.is_file():
        raise ModelLoadError(
            f"ONNX model file {path} does not exist; reinstall model {manifest.name!r} "
            "or fix its path in the agent configuration"
        )
    tokenizer = _load_tokenizer(tokenizer_path, manifest) if tokenizer_path is not None else None

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are reported in info
    if manifest.runtime.threads is not None:
        options.intra_op_num_threads = manifest.runtime.threads
    requested = choose_providers(ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile...: no common base class
        raise ModelLoadError(
            f"ONNX Runtime could not load {path} ({type(exc).__name__}: {_first_line(exc)}); "
            f"the file may be truncated or corrupt: reinstall model {manifest.name!r}"
        ) from exc

    if tokenizer is not None:
        _check_text_graph(session, path)
    actual = session.get_providers()
    info = RuntimeInfo(
        runtime="onnxruntime",
        runtime_version=str(ort.__version__),
        device=_device_for(actual[0]),
        provider=actual[0],
        load_seconds=time.perf_counter() - started,
        # An estimate: the weights' size on disk. ONNX Runtime does not expose its
        # arena size, and activations grow with batch and sequence length.
        memory_bytes=path.stat().st_size,
        details={"providers": list(actual), "requested_providers": requested},
    )
    return OnnxEmbedder(session, manifest, tokenizer, info)


def _load_tokenizer(path: Path, manifest: ModelManifest) -> Tokenizer:
    if not path.is_file():
        raise ModelLoadError(
            f"tokenizer file {path} does not exist; model {manifest.name!r} needs its "
            "tokenizer.json next to the model (runtime.tokenizer in the manifest)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for bad JSON
        raise ModelLoadError(
            f"could not read tokenizer {path} ({_first_line(exc)}); "
            f"reinstall model {manifest.name!r}"
        ) from exc
    tokenizer.enable_truncation(max_length=manifest.runtime.max_input_tokens)
    if tokenizer.padding is None:
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=pad_id or 0, pad_token="[PAD]")  # noqa: S106
    else:
        # Keep the file's pad token but pad to the longest text, never to a fixed length.
        padding = tokenizer.padding
        tokenizer.enable_padding(
            pad_id=padding["pad_id"],
            pad_type_id=padding["pad_type_id"],
            pad_token=padding["pad_token"],
            direction=padding["direction"],
            length=None,
        )
    return tokenizer


def _check_text_graph(session: ort.InferenceSession, path: Path) -> None:
    names = {a.name for a in session.get_inputs()}
    if "input_ids" not in names or not names <= _TEXT_INPUTS:
        raise ModelLoadError(
            f"{path} has a tokenizer but its graph takes {sorted(names)}; a text embedder "
            f"takes input_ids and optionally {sorted(_TEXT_INPUTS - {'input_ids'})}"
        )
    if not session.get_outputs():
        raise ModelLoadError(f"{path} has no outputs")
