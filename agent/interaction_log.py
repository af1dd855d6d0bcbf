"""The interaction log: one JSON line per request, on disk, bounded and private.

Metadata (ids, model, status, token counts, latencies) is always written. Prompt
and response bodies are written only when ``LogSettings.include_bodies`` is set,
and then only after ``redact`` masked what looks like personal data or secrets
and cut them to ``MAX_BODY_CHARS``.

Disk use never exceeds ``max_bytes * (backups + 1)``: every line is ASCII and
shorter than ``max_bytes``, and the file rotates before a line would cross it
(with ``backups == 0`` it is truncated instead). Files are created with mode
0o600, since bodies are user text.

``record()`` runs in the request path, so it never raises: a failed write (disk
full, file removed, permission changed) is counted in ``InteractionLog.dropped``
and logged once as a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import TextIOWrapper
from logging.handlers import RotatingFileHandler
from types import TracebackType
from typing import Any, Self

from agent.config import LogSettings
from agent.errors import ConfigError

__all__ = ["MAX_BODY_CHARS", "Interaction", "InteractionLog", "redact"]

_log = logging.getLogger(__name__)

MAX_BODY_CHARS = 4096  # a prompt or response is cut to this many characters
_MAX_ERROR_CHARS = 1024
_MAX_FIELD_CHARS = 256  # request id, model, endpoint
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Interaction:
    """One served (or refused) request, as the interaction log records it."""

    request_id: str
    model: str
    endpoint: str  # e.g. "/v1/chat/completions"
    status: int  # HTTP status sent
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # request received to last byte sent
    ttft_ms: float | None = None  # time to first token, streaming generation only
    error: str | None = None  # error code or message when status >= 400
    prompt: str | None = None  # written only with include_bodies, redacted
    response: str | None = None  # written only with include_bodies, redacted
    ts: str = field(default_factory=_utc_now_iso)  # UTC, ISO 8601


# --------------------------------------------------------------------------- redaction

_SCRUBBERS: list[tuple[re.Pattern[str], str]] = [
    # e-mail addresses
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[EMAIL]"),
    # Authorization header values and key=value secrets
    (
        re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer|basic|token)?\s*)\S+"),
        r"\1[TOKEN]",
    ),
    # "bearer" then a token with a digit or symbol in it: "the bearer of news" stays
    (
        re.compile(
            r"(?i)\b(bearer)\s+(?=[A-Za-z]*[0-9._~+/-][A-Za-z0-9._~+/-])[A-Za-z0-9._~+/-]{8,}=*"
        ),
        r"\1 [TOKEN]",
    ),
    (
        re.compile(
            r"(?i)\b(api[_-]?key|secret|password|passwd|access[_-]?token)([\"']?\s*[:=]\s*)\S+"
        ),
        r"\1\2[SECRET]",
    ),
    # JSON web tokens and well-known key formats
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "[TOKEN]"),
    (re.compile(r"\b(?:sk|pk|rk)[-_](?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{16,}"), "[KEY]"),
    (re.compile(r"\b(?:gh[pousr]_|github_pat_)[A-Za-z0-9_]{20,}"), "[KEY]"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "[KEY]"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "[KEY]"),
    # hex runs of 32+ with a digit (keys, digests)
    (re.compile(r"\b(?=[A-Fa-f]*\d)[0-9A-Fa-f]{32,}\b"), "[KEY]"),
]
# base64-like runs of 32+ characters count as secrets only when they mix upper case,
# lower case and digits: long words, paths and snake_case names do not.
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?!\.?\d)"
)
_CARD = re.compile(
    r"(?<![\d-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?![\d-])"
)
_PHONE = [
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)"),  # +44 20 7946 0958
    re.compile(r"(?<![\d-])\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}(?![\d-])"),  # (415) 555-0132
    re.compile(r"(?<![\d-])0\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}(?![\d-])"),  # 020 7946 0958
]


def _mask_b64(match: re.Match[str]) -> str:
    run = match.group(0)
    mixed = (
        any(c.isdigit() for c in run)
        and any(c.isupper() for c in run)
        and any(c.islower() for c in run)
    )
    return "[KEY]" if mixed else run


def _mask_phone(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    return "[PHONE]" if 7 <= digits <= 15 else match.group(0)


def redact(text: str, *, max_chars: int = MAX_BODY_CHARS) -> str:
    """``text`` with personal data and secrets masked, cut to ``max_chars`` with a marker.

    Masks e-mail addresses, bearer tokens and ``key=value`` secrets, API keys
    (``sk-...``, GitHub, Slack, AWS), JWTs, hex runs of 32+ characters and mixed
    base64 runs of 32+, IPv4 addresses, card-like digit runs (13-19 digits, plain or
    in groups of four) and phone numbers. Pure; errs on the side of masking.
    """
    total = len(text)
    text = text[: 2 * max_chars]  # bound the regex work; the cut edge is dropped below
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    text = _B64_RUN.sub(_mask_b64, text)
    text = _IPV4.sub("[IP]", text)
    text = _CARD.sub("[CARD]", text)
    for pattern in _PHONE:
        text = pattern.sub(_mask_phone, text)
    if total > max_chars or len(text) > max_chars:
        kept = text[:max_chars]
        return f"{kept}...[truncated, {total} chars]"
    return text


# --------------------------------------------------------------------------- the log


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """A rotating handler that keeps files private, bounded and quiet.

    It creates files 0o600, truncates when it keeps no backups (the stock handler
    would grow forever), and counts failed writes instead of printing to stderr.
    """

    def __init__(self, filename: str, *, max_bytes: int, backups: int) -> None:
        self.failures = 0
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> TextIOWrapper:
        return self._open_mode(os.O_APPEND)

    def _open_mode(self, flags: int) -> TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | flags, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: PTH123
        except BaseException:
            os.close(fd)
            raise

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        # RotatingFileHandler never rotates without backups; truncate to stay bounded.
        if self.stream is not None:
            self.stream.close()
        self.stream = self._open_mode(os.O_TRUNC | os.O_APPEND)

    def handleError(self, record: logging.LogRecord) -> None:
        # Called by emit() with the handler lock held, inside its except block.
        self.failures += 1
        if self.failures == 1:
            _log.warning(
                "interaction log %s: write failed, dropping records",
                self.baseFilename,
                exc_info=True,
            )


class InteractionLog:
    """Append ``Interaction`` records to a size-bounded, rotating JSON-lines file.

    One instance per agent (built in the app's lifespan); each has its own
    non-propagating logger, so nothing reaches the root logger or leaks between
    instances. With ``settings.path`` unset every call is a no-op.
    """

    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self._failed = 0  # records that never reached the handler
        self._handler: _PrivateRotatingFileHandler | None = None
        self._logger: logging.Logger | None = None
        if settings.path is None:
            return
        path = settings.path.expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            handler = _PrivateRotatingFileHandler(
                str(path), max_bytes=settings.max_bytes, backups=settings.backups
            )
        except OSError as exc:
            raise ConfigError(f"cannot open the interaction log {path}: {exc}") from exc
        handler.setFormatter(logging.Formatter("%(message)s"))
        # A Logger made directly, not through logging.getLogger: it is not registered
        # in the global logger tree, has no parent, and is collected with this object.
        logger = logging.Logger(f"edgefleet.interactions.{uuid.uuid4().hex}", logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
        self._handler, self._logger = handler, logger

    @property
    def dropped(self) -> int:
        """Records lost to write errors since this log was opened."""
        return self._failed + (self._handler.failures if self._handler is not None else 0)

    def record(self, item: Interaction) -> None:
        """Append ``item``; never raises (failures are counted in ``dropped``)."""
        if self._logger is None:
            return
        try:
            line = self._line(item)
            self._logger.info(line)
        except Exception:  # the request path must not fail because logging did
            self._failed += 1
            _log.debug("interaction log: record dropped", exc_info=True)

    def _line(self, item: Interaction) -> str:
        data: dict[str, Any] = dataclasses.asdict(item)
        for key in ("request_id", "model", "endpoint"):
            data[key] = str(data[key])[:_MAX_FIELD_CHARS]
        if item.error is not None:
            data["error"] = redact(item.error, max_chars=_MAX_ERROR_CHARS)
        prompt, response = data.pop("prompt"), data.pop("response")
        if self.settings.include_bodies:
            if prompt is not None:
                data["prompt"] = redact(prompt)
            if response is not None:
                data["response"] = redact(response)
        line = _dumps(data)
        if len(line) + 1 < self.settings.max_bytes:
            return line
        # Escaped bodies can outgrow a small max_bytes: keep the metadata, say so.
        data.pop("prompt", None)
        data.pop("response", None)
        data["bodies_dropped"] = True
        line = _dumps(data)
        if len(line) + 1 < self.settings.max_bytes:  # pragma: no branch - metadata is small
            return line
        return _dumps({"ts": item.ts, "status": item.status, "oversized": True})

    def close(self) -> None:
        """Flush and close the file; later ``record()`` calls are no-ops."""
        logger, handler = self._logger, self._handler
        self._logger = None
        if logger is not None and handler is not None:
            logger.removeHandler(handler)
            handler.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _dumps(data: dict[str, Any]) -> str:
    # ASCII only, so characters equal bytes and the rotation bound is exact.
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
