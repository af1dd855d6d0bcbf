"""Run an image build's commands: numbered steps, a build log, and progress while they run.

Every command's output goes to ``build.log`` in the output folder; the console gets the
step, a line of the command's latest output at most every few seconds, and the time the
step took. A failed command raises :class:`~fleet.errors.ImageBuildFailed` with its last
lines and the log's path, so the operator sees why without opening the log.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

from fleet.errors import ImageBuildFailed

__all__ = ["Console", "StepRunner"]

Console = Callable[[str], None]
"""Where progress goes (the CLI prints it to stderr)."""

SHOW_EVERY_S: Final = 10.0  # at most one line of a command's output this often
TAIL_LINES: Final = 15  # lines of a failed command's output in the error


class StepRunner:
    """Numbered steps of one build, with their commands' output logged."""

    def __init__(self, log: IO[str], console: Console, total: int) -> None:
        self._log = log
        self._console = console
        self._total = total
        self._number = 0
        self._started = time.monotonic()
        self._step_started = self._started

    def step(self, what: str) -> None:
        self._end_step()
        self._number += 1
        self._step_started = time.monotonic()
        line = f"[{self._number}/{self._total}] {what}"
        self._console(line)
        self._log.write(f"\n==> {line}\n")
        self._log.flush()

    def _end_step(self) -> None:
        if self._number:
            self._console(f"      done in {time.monotonic() - self._step_started:.0f} s")

    def finish(self) -> float:
        """End the last step; the whole build's seconds."""
        self._end_step()
        self._number = 0
        return time.monotonic() - self._started

    def note(self, text: str) -> None:
        self._console(f"      {text}")
        self._log.write(f"{text}\n")

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> None:
        """Run one command; its output (stderr, and stdout unless redirected) is logged."""
        argv = [os.fspath(a) for a in args]
        self._log.write(f"$ {shlex.join(argv)}\n")
        self._log.flush()
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE if stdout is not None else subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                text=False,
            )
        except OSError as exc:
            raise ImageBuildFailed(f"cannot run {argv[0]}: {exc}") from exc
        stream = proc.stderr if stdout is not None else proc.stdout
        assert stream is not None
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        shown = time.monotonic()
        with proc:  # closes the pipe and waits, also when the console raises
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                self._log.write(line + "\n")
                tail.append(line)
                if line.strip() and time.monotonic() - shown >= SHOW_EVERY_S:
                    shown = time.monotonic()
                    elapsed = shown - self._step_started
                    self._console(f"      ... {elapsed:.0f} s: {line.strip()[:100]}")
        code = proc.returncode
        self._log.flush()
        if code != 0:
            log_name = getattr(self._log, "name", "the build log")
            raise ImageBuildFailed(
                f"{shlex.join(argv)[:200]} failed (exit {code}); its last lines:\n  "
                + "\n  ".join(tail)
                + f"\nthe whole output is in {log_name}"
            )
