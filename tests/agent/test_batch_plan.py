"""The deterministic mode's step plan, checked against llama.cpp's own batch split.

``split_equal`` below follows ``llama_batch_allocr::split_equal(n_ubatch, sequential=true)``
in llama.cpp's src/llama-batch.cpp (the split it uses for non-unified KV): a ubatch
takes sequences whose ids follow each other in batch order, and the same number of
tokens from each. The plan's promise is about those ubatches: none is one token of
one sequence, and no sequence puts 64+ tokens into one.
"""

from __future__ import annotations

import random

import pytest

from agent.runtime.batch_plan import MAX_CHUNK, BatchEntry, Call, padded, split_step

N_SEQ = 8
DUMMY = 2


def split_equal(rows: list[tuple[int, int]]) -> list[dict[int, int]]:
    """llama.cpp's sequential equal split of (seq, token) rows: per ubatch, tokens per seq."""
    used = [False] * len(rows)
    ubatches: list[dict[int, int]] = []
    while not all(used):
        seqs: list[int] = []
        for i, (seq, _) in enumerate(rows):
            if used[i] or seq in seqs:
                continue
            if not seqs or seq == seqs[-1] + 1:
                seqs.append(seq)
        pending = {s: [i for i, (q, _) in enumerate(rows) if q == s and not used[i]] for s in seqs}
        take = min(len(idx) for idx in pending.values())
        for idx in pending.values():
            for i in idx[:take]:
                used[i] = True
        ubatches.append(dict.fromkeys(seqs, take))
    return ubatches


def rows_of(call: Call) -> list[tuple[int, int]]:
    return [(e.seq, t) for e in call.entries for t in e.tokens]


def plan(entries: list[BatchEntry], room: dict[int, int | None]) -> list[Call]:
    chunks, singles = split_step(entries)
    calls = [Call((chunk,)) for chunk in chunks]
    if singles:
        calls.append(padded(singles, n_seq=N_SEQ, room_at=room.get, dummy_token=DUMMY))
    return calls


def random_step(rng: random.Random) -> tuple[list[BatchEntry], dict[int, int | None]]:
    seqs = rng.sample(range(N_SEQ), rng.randint(1, N_SEQ))
    entries = []
    for seq in seqs:
        n = rng.choice([1, 1, 1, 2, rng.randint(2, 200)])
        pos = rng.randint(0, 500)
        entries.append(BatchEntry(seq, list(range(1000, 1000 + n)), pos, rng.random() < 0.8))
    room = {s: rng.randint(0, 900) for s in range(N_SEQ)}
    return entries, room


@pytest.mark.parametrize("seed", range(300))
def test_no_ubatch_is_a_lone_token_or_a_long_run_of_one_sequence(seed: int) -> None:
    entries, room = random_step(random.Random(seed))
    for call in plan(entries, room):
        for ubatch in split_equal(rows_of(call)):
            assert max(ubatch.values()) <= MAX_CHUNK
            assert len(ubatch) > 1 or next(iter(ubatch.values())) > 1, (call, ubatch)


@pytest.mark.parametrize("seed", range(100))
def test_every_token_is_decoded_once_in_order_and_logits_come_from_last_pieces(seed: int) -> None:
    entries, room = random_step(random.Random(seed))
    calls = plan(entries, room)
    decoded: dict[int, list[tuple[int, int]]] = {}
    wanting: set[int] = set()
    for call in calls:
        pads = {pad.seq for pad in call.pads}
        for entry in call.entries:
            if entry.seq in pads:
                continue
            decoded.setdefault(entry.seq, []).extend(
                (entry.pos + i, t) for i, t in enumerate(entry.tokens)
            )
            if entry.want_logits:
                assert entry.seq not in wanting
                wanting.add(entry.seq)
    for entry in entries:
        assert decoded[entry.seq] == [(entry.pos + i, t) for i, t in enumerate(entry.tokens)]
    assert wanting == {entry.seq for entry in entries if entry.want_logits}
    assert all(len(call.entries) == 1 for call in calls[:-1])  # chunks alone, singles last


def test_dummies_sit_next_to_a_lone_token_at_the_neighbours_free_position() -> None:
    call = padded(
        [BatchEntry(3, [7], 10, True), BatchEntry(5, [8], 4, True)],
        n_seq=N_SEQ,
        room_at={4: 40, 6: 60, 2: 20}.get,
        dummy_token=DUMMY,
    )
    assert call.pads == (BatchEntry(4, (DUMMY,), 40, False),)  # one dummy joins 3 and 5
    assert [e.seq for e in call.entries] == [3, 4, 5]


def test_a_neighbour_without_room_is_skipped_and_the_other_side_pads() -> None:
    call = padded(
        [BatchEntry(3, [7], 10, True)], n_seq=N_SEQ, room_at={4: None, 2: 9}.get, dummy_token=1
    )
    assert call.pads == (BatchEntry(2, (1,), 9, False),)


def test_one_slot_pads_on_the_spare_sequence() -> None:
    call = padded([BatchEntry(0, [7], 10, True)], n_seq=2, room_at={1: 0}.get, dummy_token=1)
    assert [(e.seq, e.pos, e.want_logits) for e in call.entries] == [(0, 10, True), (1, 0, False)]


def test_runs_of_two_or_more_need_no_dummy() -> None:
    singles = [BatchEntry(s, [7], 0, True) for s in (0, 1, 4, 5, 6)]
    assert padded(singles, n_seq=N_SEQ, room_at=lambda s: 0, dummy_token=1).pads == ()


def test_a_long_prompt_is_cut_into_pieces_and_a_last_token_joins_the_singles() -> None:
    prompt = BatchEntry(2, list(range(2 * MAX_CHUNK + 1)), 5, True)
    chunks, singles = split_step([prompt, BatchEntry(6, [9], 30, True)])
    assert [(c.pos, len(c.tokens), c.want_logits) for c in chunks] == [
        (5, MAX_CHUNK, False),
        (5 + MAX_CHUNK, MAX_CHUNK, False),
    ]
    assert [(s.seq, s.pos, s.want_logits) for s in singles] == [
        (2, 5 + 2 * MAX_CHUNK, True),
        (6, 30, True),
    ]
