from __future__ import annotations

from agent.serving.text import StopMatcher, Utf8Stream


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    stopped = False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_stop_string_split_across_tokens_is_caught() -> None:
    text, stopped = feed_all(StopMatcher(["END"]), ["hello E", "N", "D and more"])
    assert (text, stopped) == ("hello ", True)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello EN") == ("hello ", False)
    assert m.feed("ough") == ("ENough", False)


def test_earliest_of_several_stops_wins() -> None:
    text, stopped = feed_all(StopMatcher(["zz", "b"]), ["aaab", "zz"])
    assert (text, stopped) == ("aaa", True)


def test_without_stops_text_passes_through() -> None:
    assert feed_all(StopMatcher([]), ["a", "b"]) == ("ab", False)


def test_held_text_is_flushed_at_the_end() -> None:
    assert feed_all(StopMatcher(["###"]), ["done #", "#"]) == ("done ##", False)


def test_utf8_character_split_across_tokens_is_emitted_whole() -> None:
    stream = Utf8Stream()
    data = "é€😀".encode()
    out = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) == "é€😀"
    assert all(len(o) <= 1 for o in out)


def test_invalid_utf8_becomes_replacement_characters() -> None:
    stream = Utf8Stream()
    assert stream.feed(b"ok\xff") + stream.flush() == "ok\ufffd"
    truncated = Utf8Stream()
    assert truncated.feed("€".encode()[:2]) == ""
    assert truncated.flush() == "\ufffd"
