"""How long-running library calls report progress and learn they should stop.

The library never sleeps on a queue or touches gRPC: callers pass plain callables.
"""

from __future__ import annotations

import time
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


@dataclass
class JobHooks:
    """Progress sink and cancellation check for one call; both optional."""

    progress: Callable[[ProgressEvent], None] | None = None
    check_cancelled: Callable[[], None] | None = None
    _started: float = field(default_factory=time.monotonic)

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
        if self.progress is not None:
            self.progress(ProgressEvent(stage, step, total, frames_done, frames_total, message))

    def check(self) -> None:
        if self.check_cancelled is not None:
            self.check_cancelled()


NO_HOOKS = JobHooks()
