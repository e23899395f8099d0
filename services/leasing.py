"""Compute once across replicas: a stage job runs under a lease in the shared tier, or waits on one.

A stage job (services/jobs.py) is named by the content address of its result. Inside the job,
`Coordinator.run`:

1. returns the stored result if there is one (another replica may have published it meanwhile);
2. otherwise takes the lease on the key (services/store/lease.py) and computes, heartbeating the job's
   latest progress into the lease, and records how the job ended;
3. or, while another replica holds a live lease, waits: it relays the holder's progress to its own
   callers, returns the result as soon as it is published, and takes the job over (step 2) when the
   holder's heartbeat stops for the lease's ttl or the holder gave up without a result (its callers left,
   it shut down, it failed). A cancel request (CancelOperation on any replica) cancels the holder and
   every waiter.

The wait happens in the waiting replica's job, so identical callers on that replica share it (the job
manager dedupes them) and its queue accounts for it; it holds that replica's worker, which would
otherwise compute the very same thing.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from services.jobs import JobContext, ShuttingDown
from services.store.lease import CANCELLED, DEFAULT_TTL_SECONDS, FAILED, SUCCEEDED, LeaseRecord, LeaseTable
from tokenflow.errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_POLL_SECONDS = 0.5


def error_record(exc: BaseException) -> dict[str, Any]:
    """How a job failed, for the lease: the google.rpc.Status callers would get (code, message, details)."""
    from services.errors import status_for  # the error table lives with the gRPC glue

    status = status_for(exc)
    return {
        "code": int(status.code),
        "message": status.message,
        "status": base64.b64encode(status.SerializeToString()).decode(),
    }


class Coordinator:
    """Runs stage jobs under leases in one `LeaseTable` (see the module docstring)."""

    def __init__(
        self,
        leases: LeaseTable,
        holder: str,
        stored: Callable[[str], Any],
        ttl: float = DEFAULT_TTL_SECONDS,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        metrics: Any = None,
    ) -> None:
        self.leases = leases
        self.holder = holder
        self.stored = stored
        """The job's result if it is published (in either tier), else None."""
        self.ttl = ttl
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        """For `tokenflow_lease_waits_total` and `tokenflow_lease_takeovers_total`, or None."""

    def run(self, ctx: JobContext, key: str, compute: Callable[[], T]) -> T:
        """The job's result: stored, computed here under the lease, or computed by the lease's holder."""

        def stored() -> Any:
            return self.stored(key)

        stale_gen: int | None = None
        while True:
            found = stored()
            if found is not None:
                return found
            lease = self.leases.acquire(key, ctx.stage, self.holder, self.ttl, stale_gen=stale_gen)
            if lease is not None:
                if stale_gen:  # a lease we waited on: its holder died or gave up
                    self._count("lease_takeovers_total", ctx.stage)
                return self._compute(ctx, lease, compute)
            stale_gen = self._wait(ctx, key, stored)
            if stale_gen is None:  # published while we waited
                found = stored()
                if found is not None:
                    return found

    def _compute(self, ctx: JobContext, lease: Any, compute: Callable[[], T]) -> T:
        lease.start(
            progress=lambda: ctx.latest_progress,
            on_cancel=lambda: ctx.cancel("cancelled by request (CancelOperation)"),
        )
        try:
            result = compute()
        except BaseException as e:
            cancelled = isinstance(e, (Cancelled, ShuttingDown))
            lease.finish(CANCELLED if cancelled else FAILED, error_record(e))
            raise
        lease.finish(SUCCEEDED)
        return result

    def _wait(self, ctx: JobContext, key: str, stored: Callable[[], Any]) -> int | None:
        """Wait on another replica's lease. None once the result may be stored; else the generation to
        take over (expired, or ended without a result)."""
        seen: tuple[int, int] | None = None
        since = time.monotonic()
        counted = False
        while True:
            ctx.check_cancelled()
            record = self.leases.current(key)
            if record is None:
                return None if stored() is not None else 0  # released and gone: look again, or take it
            if self.leases.cancel_requested(key, record.gen):
                raise Cancelled("cancelled by request (CancelOperation)")
            if record.done:
                if record.state == SUCCEEDED:
                    return None
                return record.gen  # it gave up (callers left, shutdown, failure): compute it here
            beat = (record.gen, record.beat)
            if beat != seen:
                seen, since = beat, time.monotonic()
            elif time.monotonic() - since > record.ttl:
                log.warning("lease on %s held by %s stopped heartbeating: taking the job over",
                            key[:12], record.holder)  # fmt: skip
                return record.gen
            if record.expired():
                return record.gen
            if not counted:
                counted = True
                self._count("lease_waits_total", ctx.stage)
                log.info("%s job %s runs on %s: waiting on its lease", ctx.stage, key[:12], record.holder)
            ctx.report(_relayed(record))
            if stored() is not None:
                return None
            time.sleep(self.poll_seconds)

    def _count(self, counter: str, stage: str) -> None:
        metric = getattr(self.metrics, counter, None) if self.metrics is not None else None
        if metric is not None:
            metric.labels(stage=stage).inc()


def _relayed(record: LeaseRecord) -> dict[str, Any]:
    """The holder's progress as this replica's, saying who computes."""
    progress = {k: v for k, v in record.progress.items() if k != "message"}
    progress.setdefault("stage", record.stage)
    note = record.progress.get("message")
    progress["message"] = f"computed by replica {record.holder}" + (f": {note}" if note else "")
    return progress
