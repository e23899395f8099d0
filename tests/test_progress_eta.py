"""A stage job's ETA comes from the library's measured step rate, and covers the phases still to come."""

from __future__ import annotations

from typing import Any

from services.convert import progress_message
from services.metrics import Metrics
from services.progress import JobProgress


class RecordingContext:
    """The two calls JobProgress makes on a running job: progress reports and the cancellation check."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, data: dict[str, Any]) -> None:
        self.reports.append(data)

    def check_cancelled(self) -> None:
        return None


def test_eta_is_the_measured_rate_over_this_phase_and_the_next() -> None:
    ctx = RecordingContext()
    sink = JobProgress(ctx, "inversion", Metrics(), {"invert": 0.5, "reconstruct": 0.5})  # type: ignore[arg-type]
    now = [100.0]
    hooks = sink.hooks()
    hooks.clock = lambda: now[0]
    hooks.start("invert")
    for step in (1, 2):
        now[0] += 3.0  # steps of 3 s
        hooks.report("invert", step, 4)
    last = ctx.reports[-1]
    assert last["step_seconds"] == 3.0
    # 2 invert steps left at 3 s, then reconstruct: the same weight as invert, i.e. 12 s more.
    assert last["eta_seconds"] == 2 * 3.0 + 12.0
    msg = progress_message("ab" * 32, last)
    assert msg.step_time.ToNanoseconds() == 3_000_000_000 and msg.eta.seconds == 18
    # The rate follows the current speed: faster steps shorten the estimate at once.
    now[0] += 1.0
    hooks.report("invert", 3, 4)
    assert ctx.reports[-1]["eta_seconds"] < 18 - 3.0
