"""Job manager shared by the stage servicers: dedupe, a bounded queue, progress fan-out, cancellation.

Why it exists: a stage's work (an inversion, an edit) takes minutes on the one GPU a server has. So
  * identical requests in flight share one computation: the job id is the content address of the result,
    and `submit` with an id that is queued or running returns the existing job (a reconnecting caller
    re-attaches to it);
  * jobs run on `workers` threads (default one: one GPU) behind a queue of at most `max_queue` waiting
    jobs; beyond that `submit` raises `QueueFull` (RESOURCE_EXHAUSTED) so callers back off instead of
    piling up;
  * every caller streams progress through `Job.subscribe()`; a job whose every caller has gone for
    `grace_seconds` is cancelled, so an abandoned edit frees the GPU, while a caller who reconnects within
    the grace period picks up the same job;
  * cancellation is cooperative: the job's function calls `JobContext.check_cancelled()` between steps.

Finished jobs are forgotten at once: their results live in the artifact store, so the servicer checks the
store before submitting (and the job function should check it again first thing, because a job that
finished between that check and `submit` is gone from the table).

Across replicas, a `coordinator` (services/leasing.py) runs each job under a lease in the shared tier, so
identical jobs on different replicas compute once; without one, jobs are this process's alone.

Nothing here knows about torch or gRPC; servicers translate events and exceptions. A worker hands its
OpenMP team back (`tokenflow.threads.release_openmp_team`) when a job's function returns, before anyone
hears the result: libgomp keeps one team per thread that ever computed and throttles every team's
spin-waits once they hold more threads than there are CPUs, so the parked teams of idle stages would slow
the stage that computes next.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from services.logging_setup import job_context
from tokenflow.errors import Cancelled, ModelError, SpecError, TooLargeError, VideoError
from tokenflow.threads import release_openmp_team

log = logging.getLogger(__name__)

R = TypeVar("R")


class QueueFull(Exception):
    """The stage's queue is full (RESOURCE_EXHAUSTED): retry later or on another replica."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new jobs (UNAVAILABLE): retry on another replica."""


class JobState(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ProgressEvent:
    """A progress report. `data` uses the field names of the proto `Progress` message by convention."""

    job_id: str
    seq: int
    data: Mapping[str, Any]


@dataclass(frozen=True)
class ResultEvent(Generic[R]):
    """The job's return value; always the last event of a subscription."""

    job_id: str
    result: R


JobEvent = ProgressEvent | ResultEvent[Any]


def default_outcome(exc: BaseException | None) -> str:
    """Metrics outcome label of a finished job, in the services' vocabulary (lower-case gRPC names)."""
    if exc is None:
        return "ok"
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, ShuttingDown):
        return "unavailable"
    if isinstance(exc, (SpecError, VideoError)):
        return "invalid_argument"
    if isinstance(exc, (TooLargeError, QueueFull)):
        return "resource_exhausted"
    if isinstance(exc, ModelError):
        return "failed_precondition"
    if isinstance(exc, LookupError):
        return "not_found"
    return "internal"


class JobContext:
    """What a running job function sees: progress reporting and cooperative cancellation."""

    def __init__(self, job: Job[Any]) -> None:
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def stage(self) -> str:
        return self._job.stage

    @property
    def cancelled(self) -> bool:
        return self._job._cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise `tokenflow.errors.Cancelled` if the job was cancelled; call it between steps."""
        if self._job._cancel_event.is_set():
            reason = self._job._cancel_reason
            raise Cancelled(str(reason) if reason is not None else "job cancelled")

    def report(self, progress: Mapping[str, Any]) -> None:
        """Publish a progress event to every subscriber (replaces the previous one for late joiners)."""
        self._job._publish(dict(progress))

    @property
    def latest_progress(self) -> dict[str, Any] | None:
        """The last progress published (what a lease heartbeat carries to other replicas)."""
        return self._job.latest_progress

    def cancel(self, reason: str) -> None:
        """Cancel this job for every caller (a cancel request that reached another replica)."""
        self._job.cancel(reason)


class Job(Generic[R]):
    """One computation, shared by every caller that asked for the same id."""

    def __init__(self, manager: JobManager, job_id: str, fn: Callable[[JobContext], R]) -> None:
        self.id = job_id
        self.stage = manager.stage
        self._manager = manager
        self._fn = fn
        self._cond = threading.Condition()
        self.state = JobState.QUEUED
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self._seq = 0
        self._latest: dict[str, Any] | None = None
        self._result: R | None = None
        self._error: BaseException | None = None
        self._cancel_event = threading.Event()
        self._cancel_reason: BaseException | None = None
        self._attached = 0
        self._orphaned_since: float | None = time.monotonic()  # nobody attached yet

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def attached(self) -> int:
        """Number of subscribers currently attached."""
        with self._cond:
            return self._attached

    @property
    def latest_progress(self) -> dict[str, Any] | None:
        with self._cond:
            return dict(self._latest) if self._latest is not None else None

    def _publish(self, progress: dict[str, Any]) -> None:
        with self._cond:
            self._latest = progress
            self._seq += 1
            self._cond.notify_all()

    def _finish(self, state: JobState, result: R | None, error: BaseException | None) -> bool:
        with self._cond:
            if self.done:
                return False
            self.state = state
            self._result = result
            self._error = error
            self.finished = time.monotonic()
            self._cond.notify_all()
            return True

    def _request_cancel(self, reason: BaseException) -> None:
        with self._cond:
            if self.done or self._cancel_event.is_set():
                return
            self._cancel_reason = reason
            self._cancel_event.set()
            self._cond.notify_all()

    def cancel(self, reason: str = "cancelled by request") -> bool:
        """Cancel this job for every subscriber. False if it had already finished."""
        return self._manager._cancel_job(self, Cancelled(reason))

    # -- waiting -------------------------------------------------------------------------------------------

    def subscribe(
        self, is_active: Callable[[], bool] | None = None, poll_seconds: float = 0.5
    ) -> Subscription[R]:
        """Attach a caller: an iterator of the latest progress, then new progress, then the result.

        Iteration ends with a `ResultEvent` or raises the job's exception. Closing the subscription (or
        dropping it) detaches the caller. With gRPC, pass ``is_active=context.is_active`` and register
        ``context.add_callback(sub.close)`` so a departed client detaches promptly.
        """
        return Subscription(self, is_active, poll_seconds)

    def wait(self, timeout: float | None = None) -> R:
        """Block until the job finishes (without attaching); return its result or raise its exception."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
            if self._error is not None:
                raise self._error
            return self._result  # type: ignore[return-value]

    def _attach(self) -> None:
        with self._cond:
            self._attached += 1
            self._orphaned_since = None

    def _detach(self) -> None:
        with self._cond:
            self._attached -= 1
            if self._attached == 0 and not self.done:
                self._orphaned_since = time.monotonic()

    def __repr__(self) -> str:
        return f"Job({self.stage}:{self.id[:16]}, {self.state.value}, attached={self._attached})"


class Subscription(Generic[R]):
    """One attached caller's view of a job (see `Job.subscribe`). Thread-safe `close()`."""

    def __init__(self, job: Job[R], is_active: Callable[[], bool] | None, poll_seconds: float) -> None:
        self._job = job
        self._is_active = is_active
        self._poll = poll_seconds
        self._seen = 0
        self._closed = False
        self._ended = False
        job._attach()

    def __iter__(self) -> Iterator[ProgressEvent | ResultEvent[R]]:
        return self

    def __next__(self) -> ProgressEvent | ResultEvent[R]:
        job = self._job
        with job._cond:
            while True:
                if self._closed or self._ended:
                    raise StopIteration
                if job._seq > self._seen and job._latest is not None:
                    self._seen = job._seq
                    return ProgressEvent(job.id, job._seq, dict(job._latest))
                if job.done:
                    self._ended = True
                    self._close_locked()
                    if job._error is not None:
                        raise job._error
                    return ResultEvent(job.id, job._result)  # type: ignore[arg-type]
                job._cond.wait(self._poll)
                if self._is_active is not None and not self._closed and not self._is_active():
                    self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            self._job._detach()  # the Condition's lock is re-entrant
            self._job._cond.notify_all()

    def close(self) -> None:
        """Detach (idempotent). A blocked `__next__` in another thread wakes and stops."""
        with self._job._cond:
            self._close_locked()

    def __enter__(self) -> Subscription[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class JobManager:
    """Runs one stage's jobs (see the module docstring)."""

    def __init__(
        self,
        stage: str,
        max_queue: int,
        workers: int = 1,
        grace_seconds: float = 120.0,
        metrics: Any = None,
        outcome_of: Callable[[BaseException | None], str] = default_outcome,
        coordinator: Any = None,
    ) -> None:
        if workers < 1 or max_queue < 0 or grace_seconds < 0:
            raise ValueError("need workers >= 1, max_queue >= 0, grace_seconds >= 0")
        self.stage = stage
        self.max_queue = max_queue
        self.workers = workers
        self.grace_seconds = grace_seconds
        self.metrics = metrics
        self._outcome_of = outcome_of
        self.coordinator = coordinator
        """A `services.leasing.Coordinator`: jobs run under a lease shared with other replicas (or None)."""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._jobs: dict[str, Job[Any]] = {}  # queued or running, by id
        self._queue: collections.deque[Job[Any]] = collections.deque()
        self._running = 0
        self._accepting = True
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"{stage}-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name=f"{stage}-reaper", daemon=True)
        self._reaper.start()

    # -- public API ----------------------------------------------------------------------------------------

    def submit(self, job_id: str, fn: Callable[[JobContext], R]) -> Job[R]:
        """The queued or running job with this id, or a new one running `fn`.

        Raises ShuttingDown after `shutdown`, QueueFull when `max_queue` jobs already wait.
        """
        with self._lock:
            if not self._accepting:
                raise ShuttingDown(f"the {self.stage} service is shutting down; retry on another replica")
            job = self._jobs.get(job_id)
            if job is not None:
                return job
            busy = self._running + len(self._queue)
            if busy >= self.workers + self.max_queue:
                raise QueueFull(
                    f"the {self.stage} queue is full ({len(self._queue)} waiting, {self._running} running); "
                    "retry later or on another replica"
                )
            job = Job(self, job_id, fn)
            self._jobs[job_id] = job
            self._queue.append(job)
            self._publish_queue_positions()
            self._cond.notify_all()
            return job

    def get(self, job_id: str) -> Job[Any] | None:
        """The queued or running job with this id, if any."""
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job[Any]]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a queued or running job for every caller. False if no such job is in flight."""
        job = self.get(job_id)
        return job is not None and self._cancel_job(job, Cancelled(reason))

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def shutdown(self, grace: float, cancel_wait: float = 5.0) -> bool:
        """Stop accepting jobs, fail queued ones, let running ones finish for `grace` s, then cancel them.

        Returns True if every worker stopped (a job function that never checks for cancellation may keep
        its thread busy; it is a daemon thread and does not block interpreter exit).
        """
        with self._lock:
            self._accepting = False
            queued = list(self._queue)
            self._queue.clear()
            for job in queued:
                self._jobs.pop(job.id, None)
        for job in queued:
            reason = ShuttingDown(
                f"the {self.stage} service shut down before this job started; retry elsewhere"
            )
            job._request_cancel(reason)
            if job._finish(JobState.CANCELLED, None, reason):
                self._record_outcome(job, reason)
        self._update_gauges()
        deadline = time.monotonic() + max(0.0, grace)
        with self._cond:
            self._cond.wait_for(lambda: self._running == 0, timeout=max(0.0, deadline - time.monotonic()))
            running = [j for j in self._jobs.values() if j.state is JobState.RUNNING]
        for job in running:
            job._request_cancel(
                ShuttingDown(f"the {self.stage} service shut down during this job; retry elsewhere")
            )
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = time.monotonic() + max(0.0, cancel_wait)
        for t in self._threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        self._reaper_stop.set()
        self._reaper.join(timeout=1.0)
        return not any(t.is_alive() for t in self._threads)

    # -- internals -----------------------------------------------------------------------------------------

    def _cancel_job(self, job: Job[Any], reason: BaseException) -> bool:
        with self._lock:
            if job.done:
                return False
            if self._jobs.get(job.id) is job:
                del self._jobs[
                    job.id
                ]  # a new identical request starts afresh rather than joining a dying job
            was_queued = job in self._queue
            if was_queued:
                self._queue.remove(job)
                self._publish_queue_positions()
        job._request_cancel(reason)
        if was_queued and job._finish(JobState.CANCELLED, None, reason):
            self._record_outcome(job, reason)
        self._update_gauges()
        log.info("%s job %s cancelled: %s", self.stage, job.id, reason)
        return True

    def _publish_queue_positions(self) -> None:
        for position, job in enumerate(self._queue):
            job._publish(
                {
                    "stage": self.stage,
                    "phase": "queued",
                    "queue_position": position,
                    "message": f"waiting for a worker ({position} job(s) ahead)",
                }
            )
        self._update_gauges()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running += 1
                job.state = JobState.RUNNING
                job.started = time.monotonic()
                self._publish_queue_positions()
            with job_context(job.id):  # every line logged while it runs carries its id
                self._run(job)
            with self._cond:
                self._running -= 1
                if self._jobs.get(job.id) is job:
                    del self._jobs[job.id]
                self._cond.notify_all()
            self._update_gauges()

    def _run(self, job: Job[Any]) -> None:
        job._publish({"stage": self.stage, "phase": "running", "queue_position": 0})
        ctx = JobContext(job)
        try:
            if job._cancel_event.is_set():
                ctx.check_cancelled()
            try:
                if self.coordinator is not None:
                    result = self.coordinator.run(ctx, job.id, lambda: job._fn(ctx))
                else:
                    result = job._fn(ctx)
            finally:
                self._release_thread_resources()  # before a subscriber can start the next stage's work
        except BaseException as e:  # delivered to every subscriber
            error: BaseException = e
            if isinstance(e, Cancelled) and job._cancel_reason is not None:
                error = job._cancel_reason  # e.g. ShuttingDown: tell callers to retry elsewhere
            state = JobState.CANCELLED if isinstance(error, (Cancelled, ShuttingDown)) else JobState.FAILED
            if state is JobState.FAILED:
                log.error("%s job %s failed", self.stage, job.id, exc_info=(type(e), e, e.__traceback__))
            self._record_outcome(job, error)  # before subscribers hear of it, so metrics are never behind
            job._finish(state, None, error)
            return
        self._record_outcome(job, None)
        job._finish(JobState.SUCCEEDED, result, None)

    def _release_thread_resources(self) -> None:
        """Give this worker's OpenMP team back while it waits for the next job (see the module docstring)."""
        try:
            release_openmp_team()
        except Exception:  # never lose a job's result over it
            log.warning("%s worker could not release its OpenMP threads", self.stage, exc_info=True)

    def _record_outcome(self, job: Job[Any], error: BaseException | None) -> None:
        m = self.metrics
        if m is None:
            return
        total = getattr(m, "jobs_total", None)
        if total is not None:
            total.labels(stage=self.stage, outcome=self._outcome_of(error)).inc()
        seconds = getattr(m, "job_seconds", None)
        if seconds is not None and job.started is not None:  # computed jobs only, not queued-then-cancelled
            seconds.labels(stage=self.stage).observe(time.monotonic() - job.started)

    def _update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        with self._lock:
            running, queued = self._running, len(self._queue)
        if getattr(m, "jobs_in_flight", None) is not None:
            m.jobs_in_flight.labels(stage=self.stage).set(running)
        if getattr(m, "jobs_queued", None) is not None:
            m.jobs_queued.labels(stage=self.stage).set(queued)

    def _reap_loop(self) -> None:
        interval = max(0.01, min(0.25, self.grace_seconds / 4))
        while not self._reaper_stop.wait(interval):
            now = time.monotonic()
            for job in self.jobs():
                since = job._orphaned_since
                if since is not None and not job.done and now - since >= self.grace_seconds:
                    self._cancel_job(
                        job, Cancelled(f"no caller attached for {self.grace_seconds:g} s; job abandoned")
                    )

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(grace=0)
