"""The semantic answer cache, with a bag-of-words embedder whose cosines are exact."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import agent.serving.answer_cache
from agent.serving.answer_cache import CacheHit, SemanticCache
from tests.fakes.models import FakeEmbedder
from tests.fakes.word_embedder import WordEmbedder, embedder_manifest

LLM = "gemma"


@pytest.fixture
def words() -> WordEmbedder:
    return WordEmbedder()


def test_public_api() -> None:
    assert sorted(agent.serving.answer_cache.__all__) == [
        "CacheHit",
        "SemanticCache",
        "embedder_identity",
    ]


def test_a_paraphrase_finds_the_remembered_answer(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "how do I reset my router", "Hold the button for 10 s.")
    hit = cache.lookup(LLM, words, "how do I reset the router", threshold=0.8)
    # 5 of 6 words shared: cosine 5/6
    assert hit is not None
    assert hit.answer == "Hold the button for 10 s."
    assert hit.prompt == "how do I reset my router"
    assert hit.similarity == pytest.approx(5 / 6, abs=1e-6)


def test_an_unrelated_prompt_misses(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "how do I reset my router", "Hold the button.")
    assert cache.lookup(LLM, words, "capital of France", threshold=0.1) is None


def test_the_threshold_is_inclusive(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "Hold the button.")
    exact = 3 / math.sqrt(3 * 4)  # "reset my router now": 3 shared words of 3 and 4
    asked = "reset my router now"
    at = cache.lookup(LLM, words, asked, threshold=exact)
    assert at is not None
    assert at.similarity == pytest.approx(exact, abs=1e-6)
    assert cache.lookup(LLM, words, asked, threshold=exact - 0.001) is not None
    assert cache.lookup(LLM, words, asked, threshold=exact + 0.001) is None


def test_the_nearest_of_several_answers(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "router")
    cache.remember(LLM, words, "reset my password", "password")
    cache.remember(LLM, words, "reset my phone", "phone")
    hit = cache.lookup(LLM, words, "please reset my password", threshold=0.5)
    assert hit is not None
    assert (hit.answer, hit.prompt) == ("password", "reset my password")


def test_an_exact_prompt_hits_at_threshold_one_without_embedding(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "Hold the button.")
    before = words.embedded
    assert cache.lookup(LLM, words, "  reset my router\n", threshold=1.0) == CacheHit(
        answer="Hold the button.", similarity=1.0, prompt="reset my router"
    )
    assert words.embedded == before


def test_a_same_meaning_prompt_reaches_threshold_one_despite_float_rounding(
    words: WordEmbedder,
) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "go go go stop stop stop now now now", "Wait.")
    # the same bag of words, but not the same text: float32 gives this one 0.99999994
    hit = cache.lookup(LLM, words, "now now now go go go stop stop stop", threshold=1.0)
    assert hit is not None
    assert hit.similarity == pytest.approx(1.0, abs=1e-6)


def test_answers_of_one_model_never_answer_another(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember("gemma", words, "reset my router", "from gemma")
    assert cache.lookup("qwen", words, "reset my router", threshold=0.5) is None
    cache.remember("qwen", words, "reset my router", "from qwen")
    hit_gemma = cache.lookup("gemma", words, "reset my router", threshold=0.5)
    hit_qwen = cache.lookup("qwen", words, "reset my router", threshold=0.5)
    assert (hit_gemma.answer if hit_gemma else None) == "from gemma"
    assert (hit_qwen.answer if hit_qwen else None) == "from qwen"
    assert len(cache) == 2


def test_remembering_a_prompt_again_replaces_its_answer(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "old")
    cache.remember(LLM, words, " reset my router ", "new")
    assert len(cache) == 1
    hit = cache.lookup(LLM, words, "reset the router", threshold=0.5)
    assert (hit.answer if hit else None) == "new"


@pytest.mark.parametrize(
    ("prompt", "answer"), [("", "an answer"), (" \n\t", "an answer"), ("a prompt", " \n")]
)
def test_empty_prompts_and_answers_are_not_remembered(
    words: WordEmbedder, prompt: str, answer: str
) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, prompt, answer)
    assert len(cache) == 0


def test_an_empty_prompt_misses_without_embedding(words: WordEmbedder) -> None:
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "Hold the button.")
    before = words.embedded
    assert cache.lookup(LLM, words, "   ", threshold=0.1) is None
    assert words.embedded == before


def test_an_unhealthy_embedder_neither_remembers_nor_hits(words: WordEmbedder) -> None:
    sick = FakeEmbedder(embedder_manifest(), healthy=False)  # NaN vectors, same identity
    cache = SemanticCache()
    cache.remember(LLM, sick, "reset my router", "Hold the button.")
    assert len(cache) == 0
    cache.remember(LLM, words, "reset my router", "Hold the button.")
    assert cache.lookup(LLM, sick, "reset the router", threshold=0.1) is None
    assert cache.lookup(LLM, words, "?!", threshold=0.1) is None  # no words: a zero vector
    cache.remember(LLM, words, "?!", "nothing")
    assert len(cache) == 1


def test_vectors_of_another_embedder_are_never_compared(words: WordEmbedder) -> None:
    updated = WordEmbedder(embedder_manifest(sha256="1" * 64))
    cache = SemanticCache()
    cache.remember(LLM, words, "reset my router", "old model's vectors")
    cache.remember("other", words, "reset my router", "other key")
    assert cache.lookup(LLM, updated, "reset my router", threshold=0.5) is None
    cache.remember(LLM, updated, "reset my phone", "new model's vectors")
    assert len(cache) == 2  # the old embedder's entry for LLM went; the other key's stayed
    assert cache.lookup(LLM, words, "reset my router", threshold=0.5) is None
    hit = cache.lookup(LLM, updated, "reset my phone", threshold=0.5)
    assert (hit.answer if hit else None) == "new model's vectors"
    assert cache.lookup("other", words, "reset my router", threshold=0.5) is not None


def test_the_least_recently_used_entry_is_evicted(words: WordEmbedder) -> None:
    cache = SemanticCache(max_entries=3)
    for name in ("alpha", "bravo", "charlie"):
        cache.remember(LLM, words, name, name.upper())
    assert cache.lookup(LLM, words, "alpha", threshold=1.0) is not None  # a hit refreshes it
    cache.remember(LLM, words, "delta", "DELTA")
    assert len(cache) == 3
    assert cache.lookup(LLM, words, "bravo", threshold=0.1) is None
    for name in ("alpha", "charlie", "delta"):
        hit = cache.lookup(LLM, words, name, threshold=1.0)
        assert (hit.answer if hit else None) == name.upper()


def test_the_bound_holds_over_all_keys_together(words: WordEmbedder) -> None:
    cache = SemanticCache(max_entries=2)
    cache.remember("a", words, "alpha", "A1")
    cache.remember("b", words, "bravo", "B1")
    cache.remember("a", words, "charlie", "A2")
    assert len(cache) == 2
    assert cache.lookup("a", words, "alpha", threshold=0.1) is None
    assert cache.lookup("b", words, "bravo", threshold=1.0) is not None
    assert cache.lookup("a", words, "charlie", threshold=1.0) is not None


def test_rows_stay_right_as_the_matrix_grows_and_entries_are_evicted(
    words: WordEmbedder,
) -> None:
    cache = SemanticCache(max_entries=100)
    for i in range(100):
        cache.remember(LLM, words, f"item{i} common", f"answer {i}")
    # "item{i}" shares one word of two with its own entry (cosine 0.707), none with others
    for i in range(100):
        hit = cache.lookup(LLM, words, f"item{i}", threshold=0.7)
        assert (hit.answer if hit else None) == f"answer {i}"
    for i in range(0, 100, 2):  # refresh the even ones, so the odd ones go first
        assert cache.lookup(LLM, words, f"item{i} common", threshold=1.0) is not None
    cache.resize(50)
    assert len(cache) == 50
    for i in range(100):
        hit = cache.lookup(LLM, words, f"item{i}", threshold=0.7)
        assert (hit.answer if hit else None) == (f"answer {i}" if i % 2 == 0 else None)
    cache.resize(10)  # the matrix shrinks too: rows must survive the copy
    for i in range(100):
        hit = cache.lookup(LLM, words, f"item{i}", threshold=0.7)
        assert (hit.answer if hit else None) == (f"answer {i}" if i in range(80, 100, 2) else None)


def test_resize_shrinks_at_once_and_grows_for_later_entries(words: WordEmbedder) -> None:
    cache = SemanticCache(max_entries=3)
    for name in ("alpha", "bravo", "charlie"):
        cache.remember(LLM, words, name, name)
    cache.resize(1)
    assert len(cache) == 1
    assert cache.lookup(LLM, words, "charlie", threshold=1.0) is not None
    cache.resize(3)
    cache.remember(LLM, words, "delta", "delta")
    cache.remember(LLM, words, "echo", "echo")
    assert len(cache) == 3


@pytest.mark.parametrize("size", [0, -1])
def test_a_cache_holds_at_least_one_entry(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SemanticCache(max_entries=size)
    with pytest.raises(ValueError, match="at least 1"):
        SemanticCache().resize(size)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01])
def test_a_threshold_outside_zero_to_one_is_refused(words: WordEmbedder, threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        SemanticCache().lookup(LLM, words, "reset", threshold=threshold)


THREADS = 8
PER_THREAD = 40


def _worker(cache: SemanticCache, words: WordEmbedder, start: threading.Barrier, t: int) -> int:
    """Remember then look up this thread's prompts; return how many hit their own answer."""
    start.wait()
    own = 0
    for i in range(PER_THREAD):
        cache.remember(f"key{t % 2}", words, f"t{t} q{i} shared", f"answer t{t} q{i}")
        # 2 of 3 words shared with its own entry (0.816); at most 1 with any other (0.408)
        hit = cache.lookup(f"key{t % 2}", words, f"t{t} q{i}", threshold=0.8)
        if hit is not None:
            assert hit.answer == f"answer t{t} q{i}"
            assert hit.prompt == f"t{t} q{i} shared"
            own += 1
    return own


def test_threads_remembering_and_looking_up_at_once_get_their_own_answers(
    words: WordEmbedder,
) -> None:
    cache = SemanticCache(max_entries=THREADS * PER_THREAD)
    start = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        hits = list(pool.map(lambda t: _worker(cache, words, start, t), range(THREADS)))
    assert hits == [PER_THREAD] * THREADS
    assert len(cache) == THREADS * PER_THREAD


def test_threads_evicting_at_once_keep_the_bound_and_every_hit_right(
    words: WordEmbedder,
) -> None:
    cache = SemanticCache(max_entries=7)
    start = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        hits = list(pool.map(lambda t: _worker(cache, words, start, t), range(THREADS)))
    assert len(cache) == 7
    assert sum(hits) > 0  # the answers asserted inside the workers were real hits
    for t in range(THREADS):  # the survivors are whole: each still answers for itself
        for i in range(PER_THREAD):
            hit = cache.lookup(f"key{t % 2}", words, f"t{t} q{i} shared", threshold=1.0)
            assert hit is None or hit.answer == f"answer t{t} q{i}"
