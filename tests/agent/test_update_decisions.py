"""The pure parts of an update: whether to update at all, and whether the answers are healthy."""

from __future__ import annotations

import pytest

from agent.update.health import (
    DEFAULT_PROMPT,
    GoldenPrompt,
    HealthSpec,
    PromptResult,
    health_spec,
    judge,
)
from agent.update.updater import (
    GiveUp,
    Update,
    UpdateAttempts,
    UpToDate,
    memory_problem,
    next_step,
)
from models.wire import TargetRef

SHA_NEW = "11" * 32
SHA_OLD = "22" * 32
TARGET = TargetRef(path="m/2/default.gguf", length=10, sha256=SHA_NEW)


def test_the_active_target_needs_no_update() -> None:
    assert next_step(SHA_NEW, TARGET, 7, None, 3) == UpToDate()


def test_a_new_target_is_updated_to() -> None:
    assert next_step(SHA_OLD, TARGET, 7, None, 3) == Update()
    assert next_step(None, TARGET, 7, None, 3) == Update()


def test_a_failed_health_check_is_not_retried_for_the_same_desired_state() -> None:
    failed = UpdateAttempts(7, SHA_NEW, 1, gave_up="health check failed: no answer")
    assert next_step(SHA_OLD, TARGET, 7, failed, 3) == GiveUp("health check failed: no answer")


def test_a_new_desired_state_tries_the_same_target_again() -> None:
    failed = UpdateAttempts(7, SHA_NEW, 3, gave_up="health check failed")
    assert next_step(SHA_OLD, TARGET, 8, failed, 3) == Update()


def test_a_target_that_keeps_killing_the_agent_is_given_up_after_max_activations() -> None:
    assert next_step(SHA_OLD, TARGET, 7, UpdateAttempts(7, SHA_NEW, 2), 3) == Update()
    step = next_step(SHA_OLD, TARGET, 7, UpdateAttempts(7, SHA_NEW, 3), 3)
    assert isinstance(step, GiveUp)
    assert "3 times" in step.reason


def test_attempts_for_another_target_do_not_count() -> None:
    assert next_step(SHA_OLD, TARGET, 7, UpdateAttempts(7, SHA_OLD, 9, "x"), 3) == Update()


def answer(prompt: GoldenPrompt = DEFAULT_PROMPT, **kw: object) -> PromptResult:
    values: dict[str, object] = {"text": " Paris.", "tokens": 3, "seconds": 0.2, **kw}
    return PromptResult(prompt, **values)  # type: ignore[arg-type]


def test_sane_timely_answers_are_healthy() -> None:
    assert judge(HealthSpec(), [answer()]) is None


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (answer(error="llama_decode returned -1"), "failed"),
        (answer(seconds=61.0), "took 61.0 s"),
        (answer(tokens=0, text=""), "produced nothing"),
        (answer(text="\ufffd\ufffd\ufffda"), "undecodable"),
        (answer(finite=False), "NaN"),
        (answer(GoldenPrompt("2+2=", expect="4"), text=" 5"), "lacks '4'"),
    ],
)
def test_unhealthy_answers_say_why(result: PromptResult, why: str) -> None:
    problem = judge(HealthSpec((result.prompt,)), [result])
    assert problem is not None
    assert why in problem


def test_missing_answers_are_unhealthy() -> None:
    assert judge(HealthSpec((DEFAULT_PROMPT, DEFAULT_PROMPT)), [answer()]) is not None


def test_golden_prompts_come_from_the_signed_target() -> None:
    spec = health_spec(
        {
            "golden_prompts": [
                {"prompt": "2+2=", "expect": "4", "max_tokens": 4},
                {"prompt": 5},  # malformed: skipped
            ],
            "health_max_latency_s": 5,
        }
    )
    assert spec == HealthSpec((GoldenPrompt("2+2=", "4", 4),), 5.0)
    assert health_spec({}) == HealthSpec()


def test_a_model_needing_more_ram_than_the_device_has_is_refused_before_download() -> None:
    gib = 2**30
    assert memory_problem({"ram_bytes": 3 * gib}, 4 * gib) is None
    problem = memory_problem({"ram_bytes": 6 * gib}, 4 * gib)
    assert problem is not None
    assert "6.0 GiB" in problem
    assert "4.0 GiB" in problem
    assert memory_problem({}, 4 * gib) is None  # nothing signed: nothing to refuse
    assert memory_problem({"ram_bytes": 6 * gib}, None) is None  # RAM unknown
