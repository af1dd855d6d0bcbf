"""How one scheduler step becomes llama.cpp decode calls in the deterministic kernel mode.

ggml picks kernels by the shape of each micro-batch (ubatch), and their rounding
differs, so a greedy answer can change with what decodes beside it. With llamafile
built in and weights not repacked, two shapes take a path of their own on the CPU
(measured by ``scripts/probe_kernels.py``, docs/serving.md "Kernel modes"):

- **64+ query rows of one sequence**: flash attention's tiled kernel. Prompt chunks
  are capped at ``MAX_CHUNK`` tokens.
- **one token of one sequence alone in a ubatch**: the single-row dot products and
  flash attention's split-KV kernel. Such a row gets a dummy row beside it, on a
  neighbouring sequence id, removed from the KV cache after the call.

llama.cpp splits a batch over non-unified KV with ``split_equal(sequential)``: a
ubatch holds consecutive sequence ids only, and as many tokens from each as the
shortest has. Mixing chunks and single tokens in one call can therefore leave a lone
token in a ubatch, so chunks go in calls of their own, before the single tokens,
which go together in one call, sorted by sequence id: there every run of
consecutive ids is exactly one ubatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["MAX_CHUNK", "BatchEntry", "Call", "padded", "split_step"]

MAX_CHUNK = 63  # CPU flash attention tiles from GGML_FA_TILE_Q = 64 query rows per sequence


@dataclass(frozen=True)
class BatchEntry:
    """Tokens of one sequence to decode in this step, starting at KV position ``pos``."""

    seq: int
    tokens: Sequence[int]
    pos: int
    want_logits: bool  # logits of the last token, to sample the next one


@dataclass(frozen=True)
class Call:
    """One llama_decode: ``entries`` in batch order, and the dummy rows among them."""

    entries: tuple[BatchEntry, ...]
    pads: tuple[BatchEntry, ...] = ()


def split_step(entries: Sequence[BatchEntry]) -> tuple[list[BatchEntry], list[BatchEntry]]:
    """The step's multi-token chunks, each a call of its own, and its single tokens.

    Chunks longer than MAX_CHUNK are cut, and only the last piece keeps its logits; a
    last piece of one token joins the single tokens.
    """
    chunks: list[BatchEntry] = []
    singles: list[BatchEntry] = []
    for entry in entries:
        for piece in _pieces(entry):
            (singles if len(piece.tokens) == 1 else chunks).append(piece)
    return chunks, singles


def _pieces(entry: BatchEntry) -> list[BatchEntry]:
    """``entry`` in chunks of at most MAX_CHUNK tokens; only the last one keeps its logits."""
    n = len(entry.tokens)
    if n <= MAX_CHUNK:
        return [entry]
    return [
        BatchEntry(
            entry.seq,
            entry.tokens[start : start + MAX_CHUNK],
            entry.pos + start,
            entry.want_logits and start + MAX_CHUNK >= n,
        )
        for start in range(0, n, MAX_CHUNK)
    ]


def padded(
    singles: Sequence[BatchEntry],
    *,
    n_seq: int,
    room_at: Callable[[int], int | None],
    dummy_token: int,
) -> Call:
    """One call of single tokens in which no sequence id stands alone, where a neighbour can pad it.

    ``room_at(seq)`` is the next free KV position of a sequence, or None when its context
    is full and it cannot take a dummy row. Called after the step's chunks are decoded,
    so those positions are current.
    """
    by_seq = {entry.seq: entry for entry in singles}
    pads: dict[int, BatchEntry] = {}
    alone = _alone(set(by_seq), set())
    while alone:
        seq = alone.pop(0)
        pad = _neighbour_pad(seq, by_seq.keys() | pads.keys(), n_seq, room_at, dummy_token)
        if pad is not None:
            pads[pad.seq] = pad
        alone = [s for s in _alone(set(by_seq), set(pads)) if s > seq]
    ordered = tuple(sorted((*singles, *pads.values()), key=lambda e: e.seq))
    return Call(ordered, tuple(sorted(pads.values(), key=lambda e: e.seq)))


def _alone(real: set[int], pads: set[int]) -> list[int]:
    """Real sequence ids with no consecutive id beside them in the call, ascending."""
    taken = real | pads
    return sorted(s for s in real if s - 1 not in taken and s + 1 not in taken)


def _neighbour_pad(
    seq: int,
    taken: set[int],
    n_seq: int,
    room_at: Callable[[int], int | None],
    dummy_token: int,
) -> BatchEntry | None:
    for neighbour in (seq + 1, seq - 1):
        if 0 <= neighbour < n_seq and neighbour not in taken:
            pos = room_at(neighbour)
            if pos is not None:
                return BatchEntry(neighbour, (dummy_token,), pos, False)
    return None
