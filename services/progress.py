"""A stage job's progress: library events -> Progress fields with an ETA, and the step/frame metrics.

Jobs report through `JobProgress`; the job manager fans the reports out to every attached caller, and
services.convert.progress_message turns them into Progress messages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from services.jobs import JobContext
from services.metrics import Metrics
from tokenflow.progress import JobHooks
from tokenflow.progress import ProgressEvent as LibraryProgress

_STEP_PHASES = frozenset({"invert", "reconstruct", "edit", "keyframes"})
"""Library phases whose steps are UNet (denoising or inversion) steps."""


class JobProgress:
    """One job's progress sink: library events -> proto-shaped dicts with an ETA, plus step/frame metrics.

    `weights` gives each library phase its share of the whole job (e.g. invert 0.45, reconstruct 0.5), so
    the ETA covers the phases still to come, not only the current one.
    """

    def __init__(self, ctx: JobContext, stage: str, metrics: Metrics, weights: Mapping[str, float]) -> None:
        self._ctx = ctx
        self._stage = stage
        self._metrics = metrics
        self._weights = dict(weights)
        self._t0 = time.monotonic()
        self._phase: str | None = None
        self._done_weight = 0.0
        self._last_step: dict[str, int] = {}
        self._last_frames: dict[str, int] = {}

    def hooks(self) -> JobHooks:
        return JobHooks(progress=self, check_cancelled=self._ctx.check_cancelled)

    def child(self, weights: Mapping[str, float]) -> JobProgress:
        """A sink for a sub-task of the same job with its own phases (e.g. rebuilding an inversion)."""
        return JobProgress(self._ctx, self._stage, self._metrics, weights)

    def check_cancelled(self) -> None:
        self._ctx.check_cancelled()

    def start(self) -> None:
        """The compute starts now (after any wait for the model): the ETA clock starts here."""
        self._t0 = time.monotonic()
        self._phase, self._done_weight = None, 0.0

    def note(self, phase: str, message: str) -> None:
        """A progress event with only a phase and a message (waiting, loading, writing)."""
        self._ctx.report({"stage": self._stage, "phase": phase, "message": message})

    def waiting(self) -> None:
        self.note("waiting", "waiting for the model: another job is using it")

    def frames_processed(self, n: int) -> None:
        self._metrics.frames_processed_total.labels(stage=self._stage).inc(n)

    def __call__(self, event: LibraryProgress) -> None:
        phase = event.stage
        if phase != self._phase:
            if self._phase is not None:
                self._done_weight += self._weights.get(self._phase, 0.0)
            self._phase = phase
        self._count(phase, event)
        elapsed = time.monotonic() - self._t0
        weight = self._weights.get(phase, 0.0)
        fraction = self._done_weight
        if event.total:
            fraction += weight * min(1.0, event.step / event.total)
        data: dict[str, Any] = {
            "stage": self._stage,
            "phase": phase,
            "step": event.step,
            "total_steps": event.total,
            "frames_done": event.frames_done,
            "frames_total": event.frames_total,
            "elapsed_seconds": elapsed,
            "message": event.message,
        }
        if event.seconds_per_step is not None:
            data["step_seconds"] = event.seconds_per_step
        eta = self._eta(event, weight, fraction, elapsed)
        if eta is not None:
            data["eta_seconds"] = eta
        self._ctx.report(data)

    def _eta(self, event: LibraryProgress, weight: float, fraction: float, elapsed: float) -> float | None:
        """Time left in the job: this phase's rest at its measured step rate, later phases scaled from it.

        The library measures each phase's seconds per step over its last few progress points, so the
        estimate follows the current speed over a long job (a slow first step, a neighbour's load)
        rather than the average since the start. Phases still to come are estimated from the current
        phase's measured time per unit of weight. Before a rate exists: elapsed time extrapolated over
        the job's fraction done.
        """
        measured = event.eta_seconds is not None and event.seconds_per_step is not None
        if measured and event.total and weight > 0:
            phase_seconds = event.seconds_per_step * event.total
            later = max(0.0, 1.0 - self._done_weight - weight)
            return event.eta_seconds + later * phase_seconds / weight
        if 0.01 <= fraction < 1.0:
            return elapsed * (1.0 - fraction) / fraction
        return None

    def _count(self, phase: str, event: LibraryProgress) -> None:
        if phase in _STEP_PHASES:
            delta = event.step - self._last_step.get(phase, 0)
            if delta > 0:
                self._metrics.denoising_steps_total.labels(stage=self._stage).inc(delta)
            self._last_step[phase] = event.step
        elif phase == "encode":  # frames decoded and VAE-encoded
            delta = event.frames_done - self._last_frames.get(phase, 0)
            if delta > 0:
                self.frames_processed(delta)
            self._last_frames[phase] = event.frames_done
