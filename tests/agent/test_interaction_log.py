import dataclasses
import errno
import json
import logging
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import agent.interaction_log
from agent.config import LogSettings
from agent.errors import ConfigError
from agent.interaction_log import MAX_BODY_CHARS, Interaction, InteractionLog, redact


def _item(**overrides: Any) -> Interaction:
    fields: dict[str, Any] = {
        "request_id": "req-0001",
        "model": "gemma3-270m",
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "latency_ms": 123.4,
        "ttft_ms": 20.5,
    }
    fields.update(overrides)
    return Interaction(**fields)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("interactions.jsonl"))


def test_public_api() -> None:
    assert sorted(agent.interaction_log.__all__) == [
        "Interaction",
        "InteractionLog",
        "MAX_BODY_CHARS",
        "redact",
    ]


# --------------------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("text", "secret", "marker"),
    [
        ("write to jane.doe+tag@example.co.uk today", "jane.doe", "[EMAIL]"),
        ("Authorization: Bearer abc123DEF456ghi789", "abc123DEF456", "[TOKEN]"),
        ("curl -H 'authorization: basic dXNlcjpwYXNz' host", "dXNlcjpwYXNz", "[TOKEN]"),
        ("my token is bearer 9f8e7d6c.5b4a3", "9f8e7d6c", "[TOKEN]"),
        ("key sk-proj-AbCdEf1234567890XyZwvu done", "AbCdEf1234567890", "[KEY]"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc", "[KEY]"),
        ("gh token ghp_16C7e42F292c6912E7710c838347Ae178B4a ok", "16C7e42F292c6912E7710", "[KEY]"),
        ("slack xoxb-1234567890-abcdefghij", "1234567890-abcdefghij", "[KEY]"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "[KEY]"),
        ("sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709", "da39a3ee5e6b4b0d3255", "[KEY]"),
        ("b64 dGhpcyBpcyBhIHNlY3JldCBrZXkgMTIzNDU2Nzg5MA== end", "dGhpcyBpcyBh", "[KEY]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0."
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "eyJzdWIiOiIxMjM0In0",
            "[TOKEN]",
        ),
        ("config api_key=hunter2hunter2 rest", "hunter2", "api_key=[SECRET]"),
        ('{"password": "correct horse"}', '"correct', '"password": [SECRET]'),
        ("call +1 (415) 555-0132 now", "555-0132", "[PHONE]"),
        ("call +44 20 7946 0958 now", "7946 0958", "[PHONE]"),
        ("call +14155550132 now", "4155550132", "[PHONE]"),
        ("call (415) 555-0132 now", "555-0132", "[PHONE]"),
        ("call 415-555-0132 now", "555-0132", "[PHONE]"),
        ("call 415.555.0132 now", "555.0132", "[PHONE]"),
        ("call 020 7946 0958 now", "7946 0958", "[PHONE]"),
        ("card 4111 1111 1111 1111 exp", "1111 1111", "[CARD]"),
        ("card 4111-1111-1111-1111 exp", "1111-1111", "[CARD]"),
        ("card 4111111111111111 exp", "4111111111111111", "[CARD]"),
        ("amex 378282246310005 exp", "378282246310005", "[CARD]"),
        ("amex 3782 822463 10005 exp", "822463", "[CARD]"),
        ("server 192.168.1.20 is down", "192.168", "[IP]"),
        ("ping 10.0.0.1.", "10.0.0.1", "[IP]."),
    ],
)
def test_redact_masks(text: str, secret: str, marker: str) -> None:
    out = redact(text)
    assert secret not in out
    assert marker in out


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "version 1.2.3 released on 2024-01-15 at 10:30",
        "dates 2024-01-15 2024-02-16 and 2023-12-31",
        "order #12345 costs 42.50 EUR, 3 items",
        "the year 2024 had 366 days and 8784 hours",
        "pneumonoultramicroscopicsilicovolcanoconiosis is a long word",
        "/usr/local/lib/python3.11/site-packages/edgefleet/agent/probe.py",
        "snake_case_identifier_that_is_very_long_indeed",
        "the bearer of bad news arrived",
        "request 550e8400-e29b-41d4-a716-446655440000 failed",
        "not an address: 999.1.1.1 or 1.2.3.4.5",
        "scikit-learn and sk-learn are libraries",
        "Ünïcödé text, 中文, emoji 🙂 stays",
        "",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_truncates_with_a_marker() -> None:
    out = redact("a" * 5000)
    assert out == "a" * MAX_BODY_CHARS + "...[truncated, 5000 chars]"
    assert redact("abcdef", max_chars=3) == "abc...[truncated, 6 chars]"
    assert redact("abc", max_chars=3) == "abc"


def test_redact_masks_before_cutting() -> None:
    # A key straddling the cut must not leave its first half behind.
    key = "sk-" + "Ab1" * 12
    out = redact("x " * 2046 + key + " tail")
    assert len("x " * 2046) < MAX_BODY_CHARS < len("x " * 2046 + key)
    assert "Ab1Ab1" not in out
    assert out.endswith("chars]")


def test_redact_masks_several_items_in_one_text() -> None:
    out = redact("mail bob@example.com from 172.16.0.9, card 4242424242424242.")
    assert out == "mail [EMAIL] from [IP], card [CARD]."


# --------------------------------------------------------------------------- Interaction


def test_interaction_defaults_to_a_utc_timestamp() -> None:
    before = datetime.now(UTC)
    item = _item()
    ts = datetime.fromisoformat(item.ts)
    assert ts.utcoffset() == UTC.utcoffset(None)
    assert before <= ts <= datetime.now(UTC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.status = 500  # type: ignore[misc]


# --------------------------------------------------------------------------- InteractionLog


def test_no_path_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    log = InteractionLog(LogSettings())
    log.record(_item())
    log.close()
    assert list(tmp_path.iterdir()) == []
    assert log.dropped == 0


def test_writes_metadata_and_omits_bodies_by_default(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "nested" / "interactions.jsonl"
    with InteractionLog(LogSettings(path=path)) as log:
        log.record(_item(prompt="my secret plan", response="the secret answer"))
        log.record(_item(request_id="req-0002", status=429, error="rate_limit_exceeded"))
    first, second = _lines(path)
    assert first["request_id"] == "req-0001"
    assert first["model"] == "gemma3-270m"
    assert first["endpoint"] == "/v1/chat/completions"
    assert (first["status"], first["prompt_tokens"], first["completion_tokens"]) == (200, 12, 34)
    assert (first["latency_ms"], first["ttft_ms"], first["error"]) == (123.4, 20.5, None)
    assert "prompt" not in first
    assert "response" not in first
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert (second["status"], second["error"]) == (429, "rate_limit_exceeded")
    assert "secret" not in path.read_text()
    assert log.dropped == 0


def test_bodies_are_redacted_when_included(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    with InteractionLog(LogSettings(path=path, include_bodies=True)) as log:
        log.record(_item(prompt="mail me at alice@example.org", response="sure: 10.1.2.3"))
        log.record(_item(prompt=None, response=None))
    with_bodies, without = _lines(path)
    assert with_bodies["prompt"] == "mail me at [EMAIL]"
    assert with_bodies["response"] == "sure: [IP]"
    assert "prompt" not in without
    assert "alice" not in path.read_text()


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    path.write_text("")
    path.chmod(0o644)  # an older, looser file is tightened
    with InteractionLog(LogSettings(path=path, max_bytes=4096, backups=2)) as log:
        for i in range(100):
            log.record(_item(request_id=f"req-{i:04d}"))
    files = _log_files(tmp_path)
    assert len(files) == 3  # rotated at least twice
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_disk_use_is_bounded(tmp_path: Path, backups: int) -> None:
    path = tmp_path / "interactions.jsonl"
    max_bytes = 4096
    with InteractionLog(
        LogSettings(path=path, max_bytes=max_bytes, backups=backups, include_bodies=True)
    ) as log:
        for i in range(400):
            log.record(_item(request_id=f"req-{i:04d}", prompt="hello " * (i % 50)))
    files = _log_files(tmp_path)
    assert len(files) == backups + 1
    assert sum(f.stat().st_size for f in files) <= max_bytes * (backups + 1)
    assert all(f.stat().st_size <= max_bytes for f in files)
    assert _lines(path)[-1]["request_id"] == "req-0399"  # the newest record is kept
    assert log.dropped == 0


def test_oversized_bodies_keep_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    huge = "\u4e2d" * 10_000  # each escapes to 6 ASCII bytes
    with InteractionLog(LogSettings(path=path, max_bytes=4096, include_bodies=True)) as log:
        log.record(_item(prompt=huge, response=huge))
    [line] = _lines(path)
    assert line["bodies_dropped"] is True
    assert line["request_id"] == "req-0001"
    assert "prompt" not in line
    assert path.stat().st_size < 4096


class _FullDisk:
    """A stream that fails like a full disk."""

    def write(self, _text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def seek(self, *_args: int) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_write_errors_are_counted_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = InteractionLog(LogSettings(path=tmp_path / "interactions.jsonl"))
    handler = log._handler
    assert handler is not None
    handler.stream.close()
    handler.stream = _FullDisk()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="agent.interaction_log"):
        log.record(_item())
        log.record(_item())
        log.record(_item())
    assert log.dropped == 3
    warnings = [r for r in caplog.records if r.name == "agent.interaction_log"]
    assert len(warnings) == 1  # said once, not once per record
    assert "write failed" in warnings[0].getMessage()
    log.close()


def test_unserialisable_record_is_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    with InteractionLog(LogSettings(path=path)) as log:
        log.record(_item(latency_ms=float("nan")))  # not valid JSON
        log.record(_item())
    assert log.dropped == 1
    assert len(_lines(path)) == 1


def test_a_directory_as_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="interaction log"):
        InteractionLog(LogSettings(path=tmp_path))


def test_record_after_close_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    log = InteractionLog(LogSettings(path=path))
    log.record(_item())
    log.close()
    log.close()
    log.record(_item(request_id="late"))
    assert [line["request_id"] for line in _lines(path)] == ["req-0001"]
    assert log.dropped == 0


def test_instances_are_independent_and_leave_logging_alone(tmp_path: Path) -> None:
    root_handlers = list(logging.getLogger().handlers)
    known_loggers = set(logging.Logger.manager.loggerDict)
    a = InteractionLog(LogSettings(path=tmp_path / "a" / "interactions.jsonl"))
    b = InteractionLog(LogSettings(path=tmp_path / "b" / "interactions.jsonl"))
    a.record(_item(request_id="for-a"))
    a.close()
    b.close()
    assert [line["request_id"] for line in _lines(tmp_path / "a" / "interactions.jsonl")] == [
        "for-a"
    ]
    assert (tmp_path / "b" / "interactions.jsonl").read_text() == ""
    assert logging.getLogger().handlers == root_handlers
    assert set(logging.Logger.manager.loggerDict) == known_loggers
