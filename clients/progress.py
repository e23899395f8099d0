"""Progress of transfers and jobs on stderr, in the form that suits where stderr goes.

On a terminal: one line, rewritten in place (carriage return + erase-to-end-of-line) at most ~10 times a
second; a finished task's line is left standing and the next task starts a fresh one.
Anywhere else (a log file, a pipe, CI): plain lines only, written when a task starts, when its phase
changes, when it ends, and otherwise at most once every `interval` seconds, with no carriage returns or
escape codes, so a log stays readable and small.

Text that comes from the server (phase names, notes) is stripped of control characters before printing.
Depends only on the standard library and the generated messages (no tqdm).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from clients.client import phase_name, seconds
from tokenflow_pb.v1 import common_pb2

__all__ = ["Progress", "describe_progress", "describe_result"]

LOG_INTERVAL = 5.0
"""Seconds between two plain lines of the same unchanged phase when stderr is not a terminal."""

TTY_INTERVAL = 0.1
"""Seconds between two redraws of the terminal line."""

_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")  # ANSI CSI sequences and two-byte escapes
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """Text safe to print: escape sequences dropped, control characters (CR, newlines, ...) become spaces."""
    return " ".join(_CONTROL.sub(" ", _ESCAPE.sub("", text)).split())


def describe_progress(progress: common_pb2.Progress) -> tuple[str, str]:
    """(phase, detail) of a Progress message, e.g. ("invert", "12/50 24%") or ("queued", "2 ahead")."""
    phase = phase_name(progress.phase)
    parts: list[str] = []
    if phase == "queued" and progress.queue_position:
        parts.append(f"{progress.queue_position} ahead")
    step, total = progress.step, progress.total_steps
    if total:
        parts.append(f"{step}/{total} {100 * step // total}%")
    elif step:
        parts.append(str(step))
    frames, frames_total = progress.frames_done, progress.frames_total
    if frames_total:
        parts.append(f"frames {frames}/{frames_total}")
    if progress.HasField("eta"):
        parts.append(f"eta {_duration(seconds(progress.eta))}")
    note = _clean(progress.message)
    if note:
        parts.append(f"({note})")
    return phase, " ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe_result(result: common_pb2.Result) -> str:
    """ "done" or "cached" for a Result message."""
    return "cached" if result.cache_hit else "done"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class _Task:
    phase: str = ""
    text: str = ""
    last_line: float = float("-inf")


class Progress:
    """Progress printer for several labelled tasks ("upload", "inversion", "edit 0", ...).

    `interactive` defaults to whether `stream` is a terminal. Disabled, it prints nothing. Callers report
    with `transfer` (bytes), `update` (a Progress message) and `finish` (a Result message); `close` ends
    the terminal line.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool = True,
        interactive: bool | None = None,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval = interval
        self.clock = clock
        self._tasks: dict[str, _Task] = {}
        self._open_line = False  # terminal: a line is being rewritten
        self._last_draw = float("-inf")

    # -- reports ---------------------------------------------------------------------------------------

    def transfer(self, label: str, done: int, total: int) -> None:
        """Bytes moved so far (of `total`; 0 = unknown). The last call (done == total) ends the task."""
        if not self.enabled:
            return
        text = f"{_size(done)}/{_size(total)} {100 * done // total}%" if total else _size(done)
        self._report(label, "", text, final=bool(total) and done >= total)

    def update(self, label: str, progress: common_pb2.Progress) -> None:
        """A job's Progress message."""
        if not self.enabled:
            return
        phase, detail = describe_progress(progress)
        self._report(label, phase, detail, final=False)

    def finish(self, label: str, result: common_pb2.Result) -> None:
        """A job's Result message: the task's final line."""
        if not self.enabled:
            return
        self._report(label, describe_result(result), "", final=True)

    def close(self) -> None:
        """End the terminal line, if one is open; safe to call more than once."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
        self._tasks.clear()

    # -- output ----------------------------------------------------------------------------------------

    def _report(self, label: str, phase: str, detail: str, final: bool) -> None:
        task = self._tasks.get(label)
        new_task = task is None
        if task is None:
            task = self._tasks[label] = _Task()
        changed = new_task or phase != task.phase
        task.phase = phase
        head = f"{label}: {phase}" if phase else f"{label}:"
        task.text = f"{head} {detail}".rstrip()
        now = self.clock()
        if self.interactive:
            self._draw_tty(task.text, force=changed or final, now=now)
            if final:
                self.close_task(label)
            return
        if changed or final or now - task.last_line >= self.interval:
            self.stream.write(task.text + "\n")
            self.stream.flush()
            task.last_line = now
        if final:
            del self._tasks[label]

    def _draw_tty(self, text: str, force: bool, now: float) -> None:
        if not force and now - self._last_draw < TTY_INTERVAL:
            return
        # A line longer than the terminal would wrap, and "\r" only returns to the start of its last row.
        width = shutil.get_terminal_size(fallback=(80, 24)).columns - 1
        if len(text) > width > 0:
            text = text[: max(0, width - 3)] + "..."
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._open_line = True
        self._last_draw = now

    def close_task(self, label: str) -> None:
        """Terminal: leave the finished task's line standing; the next task draws a new one."""
        self._tasks.pop(label, None)
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
