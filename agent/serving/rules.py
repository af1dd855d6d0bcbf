"""The last tier before a 503: fixed answers chosen by keywords in the prompt.

A pure function of the tier and the prompt, so an operator can predict (and a test
can pin) exactly which answer a device gives when everything else has failed.

A keyword matches as a whole word or phrase, case-insensitively: "reset" answers
"Please RESET it" but not "the preset". Whole means not inside a longer word:
the keyword may not be preceded or followed by a letter, digit or underscore, which
also lets keywords that begin or end in punctuation ("c++", "wi-fi") match. Spaces
inside a phrase match any run of whitespace, line breaks included, so a prompt that
wraps in the middle of "wireless network" still matches it. Rules are tried in order
and the first one with any matching keyword answers; otherwise the tier's ``default``
does (None: fall through).
"""

from __future__ import annotations

import re
from functools import lru_cache

from models.policy import RulesTier

__all__ = ["rule_answer"]


def rule_answer(tier: RulesTier, prompt: str) -> str | None:
    """The answer of the first rule a keyword of which is in ``prompt``, else ``tier.default``."""
    for rule in tier.rules:
        pattern = _pattern(rule.keywords)
        if pattern is not None and pattern.search(prompt):
            return rule.answer
    return tier.default


@lru_cache(maxsize=1024)  # a policy holds at most MAX_RULES rules; compile each once
def _pattern(keywords: tuple[str, ...]) -> re.Pattern[str] | None:
    """One alternation of a rule's keywords, each bounded by non-word characters."""
    phrases = [r"\s+".join(re.escape(word) for word in k.split()) for k in keywords if k.strip()]
    if not phrases:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)", re.IGNORECASE)
