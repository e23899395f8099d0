"""Progress on a terminal or in a log: one display, two manners.

On a terminal, each phase is one line rewritten in place (a carriage return, no cursor movement) with
its rate and a measured ETA. Anywhere else (a file, a pipe, a CI log) it prints plain lines with no
control characters: one when a phase starts, at most one every `interval` seconds while it runs, and
one when it ends, so a long job neither floods a log nor goes silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tokenflow.progress import ProgressEvent


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressDisplay:
    """A progress sink (`JobHooks.progress`) writing to `stream` (default stderr)."""

    def __init__(
        self,
        enabled: bool = True,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if tty is None and callable(isatty) else bool(tty)
        self.interval = interval
        self._clock = clock
        self._phase: str | None = None
        self._started = 0.0
        self._last_line = 0.0
        self._open_line = False

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if event.stage != self._phase:
            self._end_line()
            self._phase, self._started, self._last_line = event.stage, now, float("-inf")
        done = bool(event.total) and event.step >= event.total
        text = self._describe(event, now - self._started)
        if self.tty:
            self.stream.write("\r" + text.ljust(78))
            self._open_line = True
            if done:
                self._end_line()
        elif done or now - self._last_line >= self.interval:
            self.stream.write(text + "\n")
            self._last_line = now
        self.stream.flush()

    def _describe(self, event: ProgressEvent, elapsed: float) -> str:
        parts = [f"{event.stage}:"]
        if event.total:
            parts.append(f"{event.step}/{event.total} ({100 * event.step / event.total:.0f}%)")
        elif event.step:
            parts.append(str(event.step))
        if event.frames_total:
            parts.append(f"frames {event.frames_done}/{event.frames_total}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if event.total and 0 < event.step < event.total and elapsed > 0:
            rate = event.step / elapsed  # measured on this phase, not guessed
            parts.append(f"eta {_clock((event.total - event.step) / rate)}")
        if event.message:
            parts.append(event.message)
        return " ".join(parts)

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def close(self) -> None:
        if self.enabled:
            self._end_line()
            self.stream.flush()
