"""How long-running library calls report progress and learn they should stop.

The library never sleeps on a queue or touches gRPC: callers pass plain callables.

Every event carries the stage's measured rate and the ETA of the stage: the rate is measured over a
moving window of the last `RateMeter.window` progress points (not the whole run, not a guess), so it
follows a long job whose steps change speed (a machine that gets busier, a cache that warms up) and
the ETA stays honest over hours. Progress inside a step counts too (frames done / frames in the step),
so a job whose single step takes minutes still moves.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "encode", "invert", "reconstruct", "edit", "keyframes", "decode"
    step: int
    total: int
    frames_done: int = 0
    frames_total: int = 0
    message: str = ""
    seconds_per_step: float | None = None  # measured over the last few progress points of this stage
    eta_seconds: float | None = None  # time left in this stage at that rate (None until measurable)


@dataclass
class RateMeter:
    """Steps per second over a moving window of (time, progress) points of one stage."""

    window: int = 8
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, when: float, progress: float) -> None:
        if self.points and progress < self.points[-1][1]:  # restarted (e.g. a retried stage): start over
            self.points.clear()
        self.points.append((when, progress))
        while len(self.points) > self.window + 1:
            self.points.popleft()

    def seconds_per_step(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, p0), (t1, p1) = self.points[0], self.points[-1]
        if p1 <= p0 or t1 <= t0:
            return None
        return (t1 - t0) / (p1 - p0)


def _progress(step: int, total: int, frames_done: int, frames_total: int) -> float:
    """Steps done, fractional inside a step: `step` complete steps plus the frames done of the next."""
    if total and step < total and frames_total and 0 < frames_done < frames_total:
        return step + frames_done / frames_total
    return float(step)


@dataclass
class JobHooks:
    """Progress sink and cancellation check for one call; both optional."""

    progress: Callable[[ProgressEvent], None] | None = None
    check_cancelled: Callable[[], None] | None = None
    _started: float = field(default_factory=time.monotonic)
    _meters: dict[str, RateMeter] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    within_step_interval: float = 2.0
    """Least seconds between two reports from inside a step (`report_within`)."""
    _last_event: float = float("-inf")

    def start(self, stage: str) -> None:
        """A stage begins now (progress 0): its first step's rate is measurable at its first report."""
        if self.progress is not None:
            self._meters[stage] = RateMeter()
            self._meters[stage].add(self.clock(), 0.0)

    def report_within(self, stage: str, step: int, total: int, frames_done: int, frames_total: int) -> None:
        """Progress inside step `step` (0-based, not yet complete), at most every `within_step_interval` s.

        Long clips have long steps; these keep the rate and ETA moving between step reports.
        """
        self.check()
        if frames_done >= frames_total:  # the step's own report follows
            return
        if self.progress is not None and self.clock() - self._last_event >= self.within_step_interval:
            self.report(stage, step, total, frames_done, frames_total)

    def report(
        self,
        stage: str,
        step: int,
        total: int,
        frames_done: int = 0,
        frames_total: int = 0,
        message: str = "",
    ) -> None:
        if self.check_cancelled is not None:
            self.check_cancelled()
        if self.progress is None:
            return
        meter = self._meters.setdefault(stage, RateMeter())
        done = _progress(step, total, frames_done, frames_total)
        meter.add(self.clock(), done)
        rate = meter.seconds_per_step()
        eta = rate * max(0.0, total - done) if rate is not None and total else None
        self._last_event = self.clock()
        self.progress(ProgressEvent(stage, step, total, frames_done, frames_total, message, rate, eta))

    def check(self) -> None:
        if self.check_cancelled is not None:
            self.check_cancelled()


NO_HOOKS = JobHooks()
