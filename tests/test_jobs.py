"""JobManager with real threads: dedupe, queue limits, cancellation, grace period, shutdown, metrics."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.jobs import (
    JobContext,
    JobManager,
    JobState,
    ProgressEvent,
    QueueFull,
    ResultEvent,
    ShuttingDown,
)
from tokenflow.errors import Cancelled, SpecError
from tokenflow.threads import loaded_libgomp_path


class Gate:
    """A job body that reports progress and waits for the test to release it, checking cancellation."""

    def __init__(self, result: Any = "done") -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.result = result
        self.saw_cancel = threading.Event()

    def __call__(self, ctx: JobContext) -> Any:
        self.calls += 1
        self.started.set()
        ctx.report({"phase": "work", "step": 1, "total_steps": 2})
        while not self.release.wait(0.01):
            try:
                ctx.check_cancelled()
            except Cancelled:
                self.saw_cancel.set()
                raise
        ctx.report({"phase": "work", "step": 2, "total_steps": 2})
        return self.result


@pytest.fixture
def manager() -> Iterator[JobManager]:
    m = JobManager("inversion", max_queue=2, workers=1, grace_seconds=0.3)
    yield m
    m.shutdown(grace=0, cancel_wait=2)


def collect(sub: Any, out: list[Any], errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            out.extend(sub)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_identical_ids_share_one_computation(manager: JobManager) -> None:
    gate = Gate(result={"digest": "x"})
    job1 = manager.submit("k1", gate)
    job2 = manager.submit("k1", gate)
    assert job1 is job2
    outs: list[list[Any]] = [[], []]
    errors: list[BaseException] = []
    threads = [collect(job1.subscribe(), outs[0], errors), collect(job2.subscribe(), outs[1], errors)]
    assert gate.started.wait(2)
    wait_for(lambda: job1.attached == 2)
    gate.release.set()
    for t in threads:
        t.join(3)
    assert not errors and gate.calls == 1
    for out in outs:
        assert isinstance(out[-1], ResultEvent) and out[-1].result == {"digest": "x"}
        assert all(isinstance(e, ProgressEvent) for e in out[:-1])
    assert manager.get("k1") is None  # finished jobs are forgotten
    assert job1.state is JobState.SUCCEEDED and job1.wait(0) == {"digest": "x"}


def test_late_subscriber_gets_latest_progress_first(manager: JobManager) -> None:
    gate = Gate()
    job = manager.submit("k", gate)
    assert gate.started.wait(2)
    wait_for(lambda: (job.latest_progress or {}).get("step") == 1)
    sub = job.subscribe()
    first = next(sub)
    assert isinstance(first, ProgressEvent) and first.data["step"] == 1
    gate.release.set()
    rest = list(sub)
    assert isinstance(rest[-1], ResultEvent) and rest[-1].result == "done"


def test_queue_full_and_queue_positions(manager: JobManager) -> None:
    gates = [Gate() for _ in range(4)]
    running = manager.submit("a", gates[0])
    assert gates[0].started.wait(2)
    q1 = manager.submit("b", gates[1])
    q2 = manager.submit("c", gates[2])
    with pytest.raises(QueueFull):
        manager.submit("d", gates[3])
    assert manager.submit("b", gates[1]) is q1  # joining a queued job is not a new submission
    assert q2.latest_progress is not None and q2.latest_progress["queue_position"] == 1
    assert manager.queued == 2 and manager.running == 1
    subs = [j.subscribe() for j in (running, q1, q2)]
    for g in gates[:3]:
        g.release.set()
    for sub in subs:
        assert isinstance(list(sub)[-1], ResultEvent)
    assert [g.calls for g in gates] == [1, 1, 1, 0]


def test_explicit_cancel_of_running_and_queued(manager: JobManager) -> None:
    g1, g2 = Gate(), Gate()
    running = manager.submit("a", g1)
    queued = manager.submit("b", g2)
    subs = [running.subscribe(), queued.subscribe()]
    assert g1.started.wait(2)
    assert manager.cancel("b") and manager.cancel("a")
    assert not manager.cancel("a") and not manager.cancel("nope")
    for sub in subs:
        with pytest.raises(Cancelled):
            list(sub)
    assert g1.saw_cancel.is_set() and g2.calls == 0
    assert running.state is JobState.CANCELLED and queued.state is JobState.CANCELLED
    # The same id later runs afresh.
    g3 = Gate()
    g3.release.set()
    again = manager.submit("a", g3)
    assert again is not running and isinstance(list(again.subscribe())[-1], ResultEvent)


def test_job_abandoned_by_every_caller_is_cancelled_after_grace(manager: JobManager) -> None:
    gate = Gate()
    job = manager.submit("k", gate)
    sub = job.subscribe()
    assert isinstance(next(sub), ProgressEvent)
    sub.close()  # the client went away
    assert job.attached == 0
    assert gate.saw_cancel.wait(2), "the job should be cancelled once the grace period passes"
    wait_for(lambda: job.done)
    assert job.state is JobState.CANCELLED and manager.get("k") is None


def test_reattach_within_grace_keeps_the_job() -> None:
    # A grace long enough that a loaded CI machine cannot push the re-attach past it.
    manager = JobManager("inversion", max_queue=2, workers=1, grace_seconds=1.0)
    try:
        gate = Gate()
        job = manager.submit("k", gate)
        sub = job.subscribe()
        next(sub)
        sub.close()
        time.sleep(0.2)  # well inside the grace period
        again = manager.submit("k", gate)
        assert again is job
        sub2 = again.subscribe()
        time.sleep(1.2)  # past the original deadline: attached, so still running
        assert not job.done and not gate.saw_cancel.is_set()
        gate.release.set()
        assert isinstance(list(sub2)[-1], ResultEvent) and gate.calls == 1
    finally:
        manager.shutdown(grace=0, cancel_wait=2)


def test_is_active_callback_detaches_a_blocked_subscriber(manager: JobManager) -> None:
    gate = Gate()
    job = manager.submit("k", gate)
    active = threading.Event()
    active.set()
    sub = job.subscribe(is_active=active.is_set, poll_seconds=0.02)
    out: list[Any] = []
    errors: list[BaseException] = []
    t = collect(sub, out, errors)
    wait_for(lambda: len(out) >= 1)
    active.clear()  # e.g. the gRPC client disconnected
    t.join(2)
    assert not t.is_alive() and job.attached == 0 and not errors
    assert gate.saw_cancel.wait(2)


def test_close_from_another_thread_wakes_the_subscriber(manager: JobManager) -> None:
    gate = Gate()
    job = manager.submit("k", gate)
    sub = job.subscribe(poll_seconds=60)
    out: list[Any] = []
    errors: list[BaseException] = []
    t = collect(sub, out, errors)
    wait_for(lambda: len(out) >= 1)
    sub.close()  # what context.add_callback(sub.close) does
    t.join(2)
    assert not t.is_alive()
    gate.release.set()


def test_exceptions_propagate_to_every_subscriber(manager: JobManager) -> None:
    release = threading.Event()

    def bad(ctx: JobContext) -> None:
        release.wait(2)
        raise SpecError("edit.prompt must not be empty")

    job = manager.submit("k", bad)
    subs = [job.subscribe(), job.subscribe()]
    release.set()
    for sub in subs:
        with pytest.raises(SpecError, match="prompt"):
            list(sub)
    assert job.state is JobState.FAILED
    with pytest.raises(SpecError):
        job.wait(1)


def test_shutdown(manager: JobManager) -> None:
    slow, queued = Gate(), Gate()
    running = manager.submit("a", slow)
    waiting = manager.submit("b", queued)
    subs = [running.subscribe(), waiting.subscribe()]
    assert slow.started.wait(2)
    t0 = time.monotonic()
    assert manager.shutdown(grace=0.1, cancel_wait=2)
    assert time.monotonic() - t0 < 2
    with pytest.raises(ShuttingDown):
        manager.submit("c", Gate())
    for sub in subs:  # callers are told to retry elsewhere (UNAVAILABLE), not that they were cancelled
        with pytest.raises(ShuttingDown):
            list(sub)
    assert slow.saw_cancel.is_set() and queued.calls == 0


def test_shutdown_lets_running_jobs_finish_within_grace() -> None:
    m = JobManager("keyframes", max_queue=1, grace_seconds=5)
    gate = Gate()
    job = m.submit("a", gate)
    sub = job.subscribe()
    assert gate.started.wait(2)
    threading.Timer(0.1, gate.release.set).start()
    assert m.shutdown(grace=3)
    assert isinstance(list(sub)[-1], ResultEvent) and not gate.saw_cancel.is_set()


def test_metrics() -> None:
    r = CollectorRegistry()
    metrics = type(
        "M",
        (),
        {
            "jobs_in_flight": Gauge("jobs_in_flight", "x", ["stage"], registry=r),
            "jobs_queued": Gauge("jobs_queued", "x", ["stage"], registry=r),
            "jobs_total": Counter("jobs_total", "x", ["stage", "outcome"], registry=r),
            "job_seconds": Histogram("job_seconds", "x", ["stage"], registry=r),
        },
    )()
    m = JobManager("propagation", max_queue=1, grace_seconds=5, metrics=metrics)
    try:
        gate = Gate()
        job = m.submit("a", gate)
        assert gate.started.wait(2)
        assert r.get_sample_value("jobs_in_flight", {"stage": "propagation"}) == 1
        gate.release.set()
        list(job.subscribe())

        def fail(ctx: JobContext) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            list(m.submit("b", fail).subscribe())
        wait_for(lambda: r.get_sample_value("jobs_in_flight", {"stage": "propagation"}) == 0)
        assert r.get_sample_value("jobs_total", {"stage": "propagation", "outcome": "ok"}) == 1
        assert r.get_sample_value("jobs_total", {"stage": "propagation", "outcome": "internal"}) == 1
        assert r.get_sample_value("job_seconds_count", {"stage": "propagation"}) == 2
    finally:
        m.shutdown(grace=0)


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or loaded_libgomp_path() is None or torch.get_num_threads() < 2,
    reason="needs Linux, torch on GNU OpenMP and at least 2 torch threads",
)
def test_a_worker_holds_no_openmp_team_once_its_job_returned(manager: JobManager) -> None:
    """Parked teams of idle stages would throttle the computing stage's spin-waits (see services.jobs)."""
    seen: dict[str, Any] = {}

    def torch_job(ctx: JobContext) -> float:
        before = {int(t) for t in os.listdir("/proc/self/task")}
        value = torch.arange(1 << 20, dtype=torch.float32).mul_(1e-6).exp_().sum().item()  # parallel region
        seen["team"] = {int(t) for t in os.listdir("/proc/self/task")} - before
        return value

    first = manager.submit("torch-1", torch_job).wait(30)
    assert seen["team"], "the job's parallel region started OpenMP workers"
    wait_for(lambda: not seen["team"] & {int(t) for t in os.listdir("/proc/self/task")}, timeout=5)
    assert manager.submit("torch-2", torch_job).wait(30) == first  # the next job builds a new team
