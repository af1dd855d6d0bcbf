"""The rule-based responder: whole words, case-insensitive, first rule wins, then the default."""

from __future__ import annotations

import pytest

import agent.serving.rules
from agent.serving.rules import rule_answer
from models.policy import Rule, RulesTier

ROUTER = Rule(keywords=("reset", "reboot"), answer="Hold the reset button for 10 seconds.")
WIFI = Rule(keywords=("wi-fi", "wireless network"), answer="The network is called edge-guest.")
HELP = RulesTier(rules=(ROUTER, WIFI), default="The assistant is offline; try again later.")


def test_public_api() -> None:
    assert agent.serving.rules.__all__ == ["rule_answer"]


@pytest.mark.parametrize(
    "prompt",
    [
        "How do I reset my router?",
        "RESET",
        "Reboot, then what?",
        "(reset)",
        "please\nreset\tit",
        "reset-button location",
    ],
)
def test_a_keyword_as_a_whole_word_answers(prompt: str) -> None:
    assert rule_answer(HELP, prompt) == ROUTER.answer


@pytest.mark.parametrize(
    "prompt",
    ["Load the preset", "resets happen", "unreset", "reset_all", "reset2", "rebooting now"],
)
def test_a_keyword_inside_a_longer_word_does_not(prompt: str) -> None:
    assert rule_answer(HELP, prompt) == HELP.default


@pytest.mark.parametrize(
    "prompt",
    ["What is the WIRELESS network?", "wireless   network name", "my Wi-Fi is down", "wi-fi?"],
)
def test_phrases_and_punctuated_keywords_match_whole(prompt: str) -> None:
    assert rule_answer(HELP, prompt) == WIFI.answer


@pytest.mark.parametrize("prompt", ["wireless networks", "a wireless mouse", "wifi", "my-wi-fiber"])
def test_part_of_a_phrase_is_not_the_phrase(prompt: str) -> None:
    assert rule_answer(HELP, prompt) == HELP.default


def test_the_first_matching_rule_answers() -> None:
    assert rule_answer(HELP, "the wi-fi died, should I reset?") == ROUTER.answer
    swapped = RulesTier(rules=(WIFI, ROUTER))
    assert rule_answer(swapped, "the wi-fi died, should I reset?") == WIFI.answer


def test_without_a_match_or_a_default_it_falls_through() -> None:
    tier = RulesTier(rules=(ROUTER,))
    assert rule_answer(tier, "What is the capital of France?") is None
    assert rule_answer(tier, "") is None


def test_a_tier_of_only_a_default_always_answers_it() -> None:
    tier = RulesTier(default="Offline.")
    assert rule_answer(tier, "anything at all") == "Offline."


def test_regex_characters_in_keywords_are_literal() -> None:
    tier = RulesTier(rules=(Rule(keywords=("c++", "a.b"), answer="literal"),))
    assert rule_answer(tier, "I write C++ daily") == "literal"
    assert rule_answer(tier, "see a.b") == "literal"
    assert rule_answer(tier, "see axb") is None
    assert rule_answer(tier, "c") is None


def test_a_blank_keyword_matches_nothing() -> None:
    tier = RulesTier(rules=(Rule(keywords=("  ",), answer="never"), ROUTER))
    assert rule_answer(tier, "a b  c") is None
    assert rule_answer(tier, "reset it") == ROUTER.answer


def test_non_ascii_words_are_whole_words_too() -> None:
    tier = RulesTier(rules=(Rule(keywords=("café",), answer="coffee"),))
    assert rule_answer(tier, "Where is the CAFÉ?") == "coffee"
    assert rule_answer(tier, "cafés") is None
