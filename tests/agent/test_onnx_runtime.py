"""ONNX runtime: a hand-checkable graph for the maths, the real MiniLM for the meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from agent.catalog import bundled_minilm
from agent.errors import InvalidRequest, ModelLoadError, ModelNotReady
from agent.runtime.base import Embedder, TensorSpec
from agent.runtime.onnx import OnnxEmbedder, choose_providers, load_onnx
from models.manifest import ModelManifest, RuntimeParams

VOCAB = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "foo": 4, "bar": 5}
# One row per token id; [PAD] is huge so any pad token leaking into the mean shows.
TABLE = np.array(
    [
        [100.0, -100.0, 50.0],  # [PAD]
        [0.0, 0.0, 1.0],  # [UNK]
        [1.0, 0.0, 0.0],  # hello
        [0.0, 1.0, 0.0],  # world
        [1.0, 1.0, 0.0],  # foo
        [3.0, 0.0, 4.0],  # bar
    ],
    dtype=np.float32,
)


def tiny_graph(path: Path, *, token_types: bool = False, sentence_output: bool = False) -> Path:
    """input_ids -> Gather(TABLE) = last_hidden_state; attention_mask is consumed as x*0."""
    dyn = ["batch", "seq"]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, dyn),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dyn),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mask_f", "zero"], ["mask_zero"]),
        helper.make_node("Unsqueeze", ["mask_zero", "last_axis"], ["mask_3d"]),
    ]
    add_inputs = ["emb", "mask_3d"]
    if token_types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, dyn))
        nodes += [
            helper.make_node("Cast", ["token_type_ids"], ["tt_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["tt_f", "zero"], ["tt_zero"]),
            helper.make_node("Unsqueeze", ["tt_zero", "last_axis"], ["tt_3d"]),
            helper.make_node("Add", ["emb", "tt_3d"], ["emb_tt"]),
        ]
        add_inputs = ["emb_tt", "mask_3d"]
    nodes.append(helper.make_node("Add", add_inputs, ["last_hidden_state"]))
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dyn, 3])]
    if sentence_output:
        nodes.append(
            helper.make_node(
                "ReduceSum", ["last_hidden_state", "seq_axis"], ["sentence"], keepdims=0
            )
        )
        outputs = [helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["batch", 3])]
    initializers = [
        numpy_helper.from_array(TABLE, "table"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_tokenizer(path: Path) -> Path:
    tokenizer = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def manifest(max_input_tokens: int = 16) -> ModelManifest:
    return ModelManifest(
        name="tiny",
        version="1.0.0",
        format="onnx",
        file="model.onnx",
        sha256="0" * 64,
        size_bytes=1,
        runtime=RuntimeParams(max_input_tokens=max_input_tokens),
    )


def unit(v: list[float]) -> np.ndarray:
    a = np.array(v, dtype=np.float32)
    return a / np.linalg.norm(a)


@pytest.fixture
def tiny(tmp_path: Path) -> OnnxEmbedder:
    model = load_onnx(
        tiny_graph(tmp_path / "model.onnx"), manifest(), tiny_tokenizer(tmp_path / "tok.json")
    )
    yield model
    model.close()


# --- provider choice ---------------------------------------------------------------


def test_providers_best_first_whatever_order_the_build_lists() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(available) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_providers_skip_unknown_and_missing_ones() -> None:
    available = ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_providers_always_end_with_cpu() -> None:
    assert choose_providers([]) == ["CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]


# --- loading and reporting ---------------------------------------------------------


def test_loaded_model_reports_what_the_session_really_uses(
    tiny: OnnxEmbedder, tmp_path: Path
) -> None:
    info = tiny.info
    assert isinstance(tiny, Embedder)
    assert info.runtime == "onnxruntime"
    assert info.runtime_version == ort.__version__
    assert info.provider in ort.get_available_providers()
    assert info.device == ("cpu" if info.provider == "CPUExecutionProvider" else "cuda:0")
    assert info.memory_bytes == (tmp_path / "model.onnx").stat().st_size
    assert info.load_seconds > 0
    assert tiny.inputs == (
        TensorSpec("input_ids", "INT64", (-1, -1)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
    )
    assert tiny.outputs == (TensorSpec("last_hidden_state", "FP32", (-1, -1, 3)),)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_provider_claimed_but_not_usable_is_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU listed as available but not really there: report the CPU the session fell to."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this build really has CUDA")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    model = load_onnx(tiny_graph(tmp_path / "m.onnx"), manifest(), None)
    assert model.info.provider == "CPUExecutionProvider"
    assert model.info.device == "cpu"
    assert model.info.details["requested_providers"] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_missing_model_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist.*reinstall model 'tiny'"):
        load_onnx(tmp_path / "absent.onnx", manifest(), None)


def test_corrupt_model_file_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf graph" * 10)
    with pytest.raises(ModelLoadError, match=r"could not load .*model\.onnx.*corrupt"):
        load_onnx(bad, manifest(), None)


def test_truncated_model_file_is_a_load_error(tmp_path: Path) -> None:
    good = tiny_graph(tmp_path / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        load_onnx(tmp_path / "model.onnx", manifest(), None)


def test_missing_tokenizer_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer file .*tok\.json does not exist"):
        load_onnx(tiny_graph(tmp_path / "m.onnx"), manifest(), tmp_path / "tok.json")


def test_corrupt_tokenizer_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not read tokenizer"):
        load_onnx(tiny_graph(tmp_path / "m.onnx"), manifest(), tmp_path / "tok.json")


def test_tokenizer_with_a_graph_that_takes_no_text_is_a_load_error(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "id.onnx"))
    with pytest.raises(ModelLoadError, match=r"graph takes \['x'\]"):
        load_onnx(tmp_path / "id.onnx", manifest(), tiny_tokenizer(tmp_path / "tok.json"))


# --- embedding ---------------------------------------------------------------------


def test_mean_pooling_then_unit_length(tiny: OnnxEmbedder) -> None:
    vectors = tiny.embed(["hello world", "bar"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, 3)
    np.testing.assert_allclose(vectors[0], unit([0.5, 0.5, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(vectors[1], [0.6, 0.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_padding_does_not_move_a_vector(tiny: OnnxEmbedder) -> None:
    alone = tiny.embed(["foo"])[0]
    padded = tiny.embed(["foo", "hello world bar hello world"])[0]
    np.testing.assert_allclose(padded, alone, rtol=1e-6)
    np.testing.assert_allclose(alone, unit([1.0, 1.0, 0.0]), rtol=1e-6)


def test_unknown_words_map_to_unk(tiny: OnnxEmbedder) -> None:
    np.testing.assert_allclose(tiny.embed(["zebra"])[0], [0.0, 0.0, 1.0], rtol=1e-6)


def test_truncation_to_max_input_tokens(tmp_path: Path) -> None:
    model = load_onnx(
        tiny_graph(tmp_path / "m.onnx"),
        manifest(max_input_tokens=2),
        tiny_tokenizer(tmp_path / "t"),
    )
    np.testing.assert_allclose(
        model.embed(["hello world bar bar bar"])[0], model.embed(["hello world"])[0], rtol=1e-6
    )
    assert model.count_tokens(["hello world bar bar", "foo"]) == 3


def test_count_tokens_excludes_padding(tiny: OnnxEmbedder) -> None:
    assert tiny.count_tokens(["hello", "hello world bar foo"]) == 5
    assert tiny.count_tokens([]) == 0


def test_tokenizer_file_with_fixed_padding_pads_to_the_longest(tmp_path: Path) -> None:
    """A tokenizer.json that pads to a fixed length would put pads in every row."""
    tok = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=12)
    tok.save(str(tmp_path / "tok.json"))
    model = load_onnx(tiny_graph(tmp_path / "m.onnx"), manifest(), tmp_path / "tok.json")
    np.testing.assert_allclose(model.embed(["bar"])[0], [0.6, 0.0, 0.8], rtol=1e-6)


def test_graph_with_token_type_ids_is_fed_them(tmp_path: Path) -> None:
    model = load_onnx(
        tiny_graph(tmp_path / "m.onnx", token_types=True),
        manifest(),
        tiny_tokenizer(tmp_path / "t"),
    )
    assert [s.name for s in model.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    np.testing.assert_allclose(model.embed(["bar"])[0], [0.6, 0.0, 0.8], rtol=1e-6)


def test_sentence_output_is_normalised_not_pooled_again(tmp_path: Path) -> None:
    model = load_onnx(
        tiny_graph(tmp_path / "m.onnx", sentence_output=True),
        manifest(),
        tiny_tokenizer(tmp_path / "t"),
    )
    # The graph sums (no mean): hello + bar + bar = [7, 0, 8].
    np.testing.assert_allclose(model.embed(["hello bar bar"])[0], unit([7.0, 0.0, 8.0]), rtol=1e-6)


def test_more_texts_than_one_chunk(tiny: OnnxEmbedder) -> None:
    texts = ["hello", "bar", "foo world"] * 50
    vectors = tiny.embed(texts)
    assert vectors.shape == (150, 3)
    np.testing.assert_allclose(vectors[149], unit([1.0, 2.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(vectors[0::3], np.repeat(vectors[:1], 50, axis=0), rtol=1e-6)


def test_embed_refuses_nothing_and_non_strings(tiny: OnnxEmbedder) -> None:
    with pytest.raises(InvalidRequest, match="at least one text"):
        tiny.embed([])
    with pytest.raises(InvalidRequest, match="must be a string"):
        tiny.embed(["ok", 3])  # type: ignore[list-item]


def test_embed_without_tokenizer_says_what_to_do(tmp_path: Path) -> None:
    model = load_onnx(tiny_graph(tmp_path / "m.onnx"), manifest(), None)
    with pytest.raises(InvalidRequest, match="no tokenizer"):
        model.embed(["hello"])
    with pytest.raises(InvalidRequest, match="no tokenizer"):
        model.count_tokens(["hello"])


# --- raw tensors -------------------------------------------------------------------


def ids(*rows: list[int]) -> dict[str, np.ndarray]:
    a = np.array(rows, dtype=np.int64)
    return {"input_ids": a, "attention_mask": np.ones_like(a)}


def test_infer_runs_the_graph(tiny: OnnxEmbedder) -> None:
    out = tiny.infer(ids([2, 5]))
    assert list(out) == ["last_hidden_state"]
    np.testing.assert_array_equal(out["last_hidden_state"], TABLE[[[2, 5]]])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": np.zeros((1, 2), np.int64)}, r"missing: \['attention_mask'\]"),
        (
            {**ids([1]), "extra": np.zeros((1, 1), np.int64)},
            r"unknown: \['extra'\]",
        ),
        (
            {"input_ids": np.zeros((1, 2), np.int32), "attention_mask": np.ones((1, 2), np.int64)},
            "'input_ids' must be INT64, got numpy int32",
        ),
        (
            {"input_ids": np.zeros(2, np.int64), "attention_mask": np.ones((1, 2), np.int64)},
            r"'input_ids' must have rank 2 .* got shape \[2\]",
        ),
    ],
    ids=["missing", "unknown", "dtype", "rank"],
)
def test_infer_checks_inputs_against_the_graph(
    tiny: OnnxEmbedder, inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        tiny.infer(inputs)


def test_infer_checks_fixed_dimensions(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "relu.onnx"))
    relu = load_onnx(tmp_path / "relu.onnx", manifest(), None)
    with pytest.raises(InvalidRequest, match="'x' dimension 1 must be 4, got 3"):
        relu.infer({"x": np.zeros((2, 3), np.float32)})
    out = relu.infer({"x": np.array([[-1, 2, -3, 4]], np.float32)})
    np.testing.assert_array_equal(out["y"], [[0, 2, 0, 4]])


def test_runtime_failures_become_invalid_request(tiny: OnnxEmbedder) -> None:
    with pytest.raises(InvalidRequest, match="ONNX Runtime rejected the input for 'tiny'") as err:
        tiny.infer(ids([2, 99]))  # Gather index out of the table
    assert err.value.__cause__ is not None
    mismatched = {
        "input_ids": np.zeros((1, 2), np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
    }
    with pytest.raises(InvalidRequest, match="ONNX Runtime rejected"):
        tiny.infer(mismatched)


def test_close_is_idempotent_and_final(tiny: OnnxEmbedder) -> None:
    tiny.close()
    tiny.close()
    with pytest.raises(ModelNotReady, match="unloaded"):
        tiny.embed(["hello"])
    with pytest.raises(ModelNotReady):
        tiny.infer(ids([2]))


# --- the real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> OnnxEmbedder:
    model_path, tokenizer_path = bundled_minilm()
    real = ModelManifest(
        name="all-minilm-l6-v2",
        version="1.0.0",
        format="onnx",
        file=model_path.name,
        sha256="0" * 64,
        size_bytes=model_path.stat().st_size,
        runtime=RuntimeParams(max_input_tokens=256, embedding_dim=384),
    )
    model = load_onnx(model_path, real, tokenizer_path)
    yield model
    model.close()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.integration
def test_minilm_vectors_are_384_wide_and_unit_length(minilm: OnnxEmbedder) -> None:
    vectors = minilm.embed(["A man is eating food.", "Hello", "word " * 1000])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.count_tokens(["word " * 1000]) == 256
    assert minilm.info.memory_bytes > 10 * 2**20


@pytest.mark.integration
def test_minilm_puts_similar_sentences_closer(minilm: OnnxEmbedder) -> None:
    food, bread, horse = minilm.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    )
    assert cosine(food, bread) > cosine(food, horse) + 0.1


@pytest.mark.integration
def test_minilm_batch_equals_one_by_one(minilm: OnnxEmbedder) -> None:
    texts = [
        "A man is eating food.",
        "The new movie is awesome, I loved every minute of it and will watch it again.",
        "Hi",
    ]
    batch = minilm.embed(texts)
    single = np.concatenate([minilm.embed([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)
