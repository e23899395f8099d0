"""Leases in the shared tier (services/store/lease.py) and compute-once across replicas
(services/leasing.py), in-process: on a volume directory and on a real S3-compatible server (moto).

Two `JobManager`s with their own `Coordinator` stand for two replicas: they share only the lease medium
and a result table the test owns (standing in for the shared store's published artifacts).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import JobContext, JobManager
from services.leasing import Coordinator
from services.store.lease import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    LeaseMedium,
    LeaseRecord,
    LeaseTable,
    S3LeaseMedium,
    VolumeLeaseMedium,
)
from tokenflow.errors import Cancelled

KEY = "a" * 64


@pytest.fixture(params=["volume", "s3"])
def medium(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseMedium]:
    if request.param == "volume":
        yield VolumeLeaseMedium(tmp_path / "shared")
        return
    endpoint = request.getfixturevalue("s3_server")
    from services.store.s3 import S3Tier

    bucket = f"leases-{uuid.uuid4().hex[:12]}"
    tier = S3Tier(bucket, prefix="fleet", endpoint_url=endpoint)
    tier._client.create_bucket(Bucket=bucket)
    try:
        yield S3LeaseMedium(tier)
    finally:
        tier.close()


def test_one_holder_per_key_and_a_finished_lease_frees_the_key(medium: LeaseMedium) -> None:
    table = LeaseTable(medium)
    first = table.acquire(KEY, "inversion", "replica-a")
    assert first is not None and first.gen == 1
    assert table.acquire(KEY, "inversion", "replica-b") is None  # live: the second replica waits
    current = table.current(KEY)
    assert current is not None and (current.holder, current.state, current.gen) == ("replica-a", RUNNING, 1)
    first.start(progress=lambda: {"phase": "invert", "step": 3}, interval=3600)
    assert first.beat()
    beat = table.current(KEY)
    assert beat is not None and beat.beat == 1 and beat.progress == {"phase": "invert", "step": 3}
    first.finish(SUCCEEDED)
    assert table.current(KEY).state == SUCCEEDED  # type: ignore[union-attr]
    second = table.acquire(KEY, "inversion", "replica-b")
    assert second is not None and second.gen == 2
    assert [r.gen for r in table.records()] == [2]  # the older generation is deleted on takeover
    second.finish(FAILED, {"code": 13, "message": "boom"})
    assert table.current(KEY).error == {"code": 13, "message": "boom"}  # type: ignore[union-attr]


def test_exactly_one_of_many_concurrent_acquirers_wins(medium: LeaseMedium) -> None:
    table = LeaseTable(medium)
    barrier = threading.Barrier(6)
    won: list[Any] = []

    def race(i: int) -> None:
        barrier.wait()
        lease = table.acquire(KEY, "inversion", f"replica-{i}")
        if lease is not None:
            won.append(lease)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert table.current(KEY).holder == won[0].record.holder  # type: ignore[union-attr]


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off(medium: LeaseMedium) -> None:
    table = LeaseTable(medium)
    old = table.acquire(KEY, "inversion", "replica-a", ttl=2)
    assert old is not None
    assert table.acquire(KEY, "inversion", "replica-b", ttl=2) is None
    time.sleep(2.5)  # no heartbeat: expired by the wall clock
    new = table.acquire(KEY, "inversion", "replica-b", ttl=30)
    assert new is not None and new.gen == 2
    lost: list[bool] = []
    old._on_lost = lambda: lost.append(True)
    assert not old.beat() and old.lost and lost == [True]  # the fencing token: a higher generation exists
    old.finish(SUCCEEDED)  # a fenced-off holder never writes over the new generation
    current = table.current(KEY)
    assert current is not None and (current.gen, current.holder, current.state) == (2, "replica-b", RUNNING)
    # A waiter that saw generation 2's heartbeat stop may take it over even if the wall clock disagrees.
    third = table.acquire(KEY, "inversion", "replica-c", stale_gen=2)
    assert third is not None and third.gen == 3


def test_a_cancel_request_reaches_the_holder(medium: LeaseMedium) -> None:
    table = LeaseTable(medium)
    lease = table.acquire(KEY, "propagation", "replica-a")
    assert lease is not None
    cancelled = threading.Event()
    lease.start(progress=lambda: None, on_cancel=cancelled.set, interval=0.05)
    table.request_cancel(KEY, lease.gen)
    assert table.cancel_requested(KEY, lease.gen)
    assert cancelled.wait(10)
    lease.finish(CANCELLED, {"code": 1, "message": "cancelled"})
    assert table.current(KEY).state == CANCELLED  # type: ignore[union-attr]
    assert table.sweep(now=time.time() + 10 * 3600) == 1 and table.current(KEY) is None


def test_a_torn_record_is_not_a_lease() -> None:
    assert LeaseRecord.from_json(b'{"key": "x"') is None
    assert LeaseRecord.from_json(b'{"key": "x"}') is None


# ----------------------------------------------------------------------------------------------------------
# compute once across two replicas


class Replica:
    """One replica's stage: a job manager whose jobs run under the shared leases."""

    def __init__(self, name: str, medium: LeaseMedium, results: dict[str, str], ttl: float) -> None:
        self.name = name
        self.coordinator = Coordinator(LeaseTable(medium), name, results.get, ttl=ttl, poll_seconds=0.02)
        self.jobs = JobManager("inversion", max_queue=4, grace_seconds=30, coordinator=self.coordinator)
        self.results = results
        self.computed = 0
        self.started = threading.Event()
        self.release = threading.Event()

    def job(self, key: str) -> Any:
        def compute(ctx: JobContext) -> str:
            self.computed += 1
            self.started.set()
            while not self.release.wait(0.02):
                ctx.report({"phase": "invert", "step": self.computed})
                ctx.check_cancelled()
            self.results[key] = f"computed by {self.name}"
            return self.results[key]

        return self.jobs.submit(key, compute)

    def close(self) -> None:
        self.release.set()
        self.jobs.shutdown(grace=0)


def test_identical_jobs_on_two_replicas_compute_once(tmp_path: Path) -> None:
    medium = VolumeLeaseMedium(tmp_path / "shared")
    results: dict[str, str] = {}
    a, b = Replica("a", medium, results, ttl=5), Replica("b", medium, results, ttl=5)
    try:
        job_a = a.job(KEY)
        assert a.started.wait(10)
        job_b = b.job(KEY)
        with job_b.subscribe() as sub:  # b's callers see a's progress while b waits
            messages = (str(event.data.get("message", "")) for event in sub)
            assert any("computed by replica a" in m for m in messages)
        a.release.set()
        assert job_a.wait(10) == job_b.wait(10) == "computed by a"
        assert (a.computed, b.computed) == (1, 0)
    finally:
        a.close()
        b.close()


def test_a_waiting_replica_takes_over_when_the_holder_stops_heartbeating(tmp_path: Path) -> None:
    medium = VolumeLeaseMedium(tmp_path / "shared")
    results: dict[str, str] = {}
    a, b = Replica("a", medium, results, ttl=0.3), Replica("b", medium, results, ttl=0.3)
    try:
        a.job(KEY)
        assert a.started.wait(10)
        lease = LeaseTable(medium).current(KEY)
        assert lease is not None and lease.holder == "a"
        job_b = b.job(KEY)
        time.sleep(0.2)
        assert b.computed == 0  # a is alive: b waits
        # Stop a's heartbeat the way a dead process would: its lease record stops changing. (The fleet
        # test SIGKILLs a real replica.)
        a.coordinator.leases.medium = _Frozen(medium)  # type: ignore[assignment]
        b.release.set()
        assert job_b.wait(20) == "computed by b" and b.computed == 1
        record = LeaseTable(medium).current(KEY)
        assert record is not None and record.holder == "b" and record.gen == 2 and record.state == SUCCEEDED
    finally:
        a.close()
        b.close()


def test_cancel_on_any_replica_cancels_the_holder_and_the_waiters(tmp_path: Path) -> None:
    medium = VolumeLeaseMedium(tmp_path / "shared")
    results: dict[str, str] = {}
    a, b = Replica("a", medium, results, ttl=5), Replica("b", medium, results, ttl=0.2)
    a.coordinator.ttl = 0.2  # heartbeat every 50 ms: the cancel request is seen quickly
    try:
        job_a = a.job(KEY)
        assert a.started.wait(10)
        job_b = b.job(KEY)
        time.sleep(0.1)
        table = LeaseTable(medium)
        table.request_cancel(KEY, table.current(KEY).gen)  # type: ignore[union-attr]
        with pytest.raises(Cancelled):
            job_a.wait(10)
        with pytest.raises(Cancelled):
            job_b.wait(10)
        assert table.current(KEY).state == CANCELLED  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


class _Frozen:
    """A medium whose writes are dropped: what other replicas see of a holder that died."""

    def __init__(self, medium: LeaseMedium) -> None:
        self._medium = medium

    def __getattr__(self, name: str) -> Any:
        return getattr(self._medium, name)

    def replace(self, name: str, data: bytes) -> None:
        return None
