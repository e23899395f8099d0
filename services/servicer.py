"""The base of the three stage servicers (Inversion, Keyframes, Propagation): one request flow.

Every stage RPC follows one order, so every stage behaves the same for callers:

1. validate the request and turn proto specs into library specs (bad input -> INVALID_ARGUMENT);
2. compute the content address of the result (inputs' digests, specs, model fingerprint);
3. a stored result is returned at once (`cache_hit`);
4. otherwise the inputs are checked (NOT_FOUND before a queue slot is taken) and the job is submitted to
   the stage's `JobManager`, which dedupes identical requests in flight (same key -> same job, so a
   caller who reconnects re-attaches) and bounds the queue (RESOURCE_EXHAUSTED);
5. the caller streams the job's progress and then its result. A caller who leaves (deadline, cancel,
   dropped connection) only detaches: the job keeps running for the grace period, for a re-attach.

Servicers raise; services.errors.ErrorInterceptor maps exceptions to statuses for every RPC. With tokens
(services/auth.py) every caller of a job is attached to it by name and every result it receives is
recorded as requested by it; Cancel is for attached callers and admins (services/access.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from services.access import OPEN, Access
from services.auth import current_principal
from services.convert import artifact_kind, check_digest, enum_value, progress_message
from services.errors import outcome_for
from services.jobs import JobContext, JobManager, ResultEvent, ShuttingDown
from services.metrics import Metrics
from services.model_host import ModelHost
from services.request_limits import DEFAULT_REQUEST_LIMITS, RequestLimits
from services.store import ArtifactStore, Manifest
from tokenflow.limits import DEFAULT_LIMITS, DecodeLimits
from tokenflow_pb.v1 import common_pb2


@dataclass(frozen=True)
class JobOutput:
    """What a stage job returns: the published artifact, and whether this job computed it."""

    manifest: Manifest
    computed: bool


def already_stored(store: ArtifactStore, key: str, kind: str) -> JobOutput | None:
    """A job's first step: the result may have been published since the caller looked (counted once).

    `contains` first, so the caller's miss is not counted twice in the cache metrics. Verified: a
    corrupt stored result is removed and recomputed, never returned.
    """
    if not store.contains(key):
        return None
    stored = store.get(key, kind=kind, verify=True)
    return JobOutput(stored.manifest, computed=False) if stored is not None else None


@dataclass(frozen=True)
class Plan:
    """A validated request: the key of its result, a pre-flight input check, and the job function."""

    key: str
    precheck: Callable[[], None]
    run: Callable[[JobContext], JobOutput]


class StageServicer:
    """Base of the stage servicers: request flow, job management, Cancel, request metrics.

    Subclasses set `stage`, `kind` and `service_name`, build a `Plan` per request and turn a stored
    manifest into a `Result` (`result`).
    """

    stage: ClassVar[str]
    kind: ClassVar[str]
    service_name: ClassVar[str]
    response_type: ClassVar[Any]
    """The job RPC's stream message (InvertResponse, ...): a oneof `event` of `progress` or `result`."""
    cancel_response_type: ClassVar[Any]
    decode_limits: DecodeLimits = DEFAULT_LIMITS
    """What decoding an upload may cost; the server sets its configured limits."""
    access: Access = OPEN
    """Access control; the server sets its own (services/access.py)."""
    request_limits: RequestLimits = DEFAULT_REQUEST_LIMITS
    """Prompt length, steps and schedule size a request may ask for; the server sets its configured ones."""

    def __init__(
        self,
        store: ArtifactStore,
        model_host: ModelHost,
        metrics: Metrics,
        max_queue: int = 8,
        grace_seconds: float = 120.0,
    ) -> None:
        self.store = store
        self.model_host = model_host
        self.metrics = metrics
        self.jobs = JobManager(
            self.stage,
            max_queue=max_queue,
            workers=1,  # one model per process: jobs of a stage run one at a time
            grace_seconds=grace_seconds,
            metrics=metrics,
            outcome_of=outcome_for,
        )
        self._draining = threading.Event()

    def result(self, manifest: Manifest, cache_hit: bool) -> common_pb2.Result:
        raise NotImplementedError

    def base_result(self, manifest: Manifest, cache_hit: bool, warnings: list[str]) -> common_pb2.Result:
        return common_pb2.Result(
            job_id=manifest.key,
            digest=manifest.key,
            kind=artifact_kind(manifest.kind),
            cache_hit=cache_hit,
            files=[
                common_pb2.FileInfo(name=n, size=e.size, sha256=e.sha256, media_type=e.media_type)
                for n, e in sorted(manifest.files.items())
            ],
            model=str(manifest.meta.get("model_name", "")),
            test_model=bool(manifest.meta.get("test_model", False)),
            warnings=warnings,
        )

    # -- request flow --------------------------------------------------------------------------------------

    def stream(self, method: str, context: grpc.ServicerContext, plan: Callable[[], Plan]) -> Iterator[Any]:
        """Run the request flow of the module docstring, yielding `response_type` events.

        Errors are raised; services.errors.ErrorInterceptor turns them into statuses and records the
        request metrics (`method` names the RPC in logs only).
        """
        p = plan()
        principal = current_principal()
        # A cache hit hashes every file: a corrupt result is removed here and recomputed below.
        stored = self.store.get(p.key, kind=self.kind, verify=True)
        if stored is not None:
            self.access.record(p.key, principal, "requested")
            yield self.response_type(progress=self._cached_progress(p.key))
            yield self.response_type(result=self.result(stored.manifest, cache_hit=True))
            return
        if self._draining.is_set():
            raise ShuttingDown(f"the {self.stage} service is shutting down; retry on another replica")
        if self.jobs.get(p.key) is None:  # a running job already passed its pre-flight check
            p.precheck()
        job = self.jobs.submit(p.key, p.run)
        self.access.attach(job, principal)
        with job.subscribe(is_active=context.is_active) as sub:
            context.add_callback(sub.close)
            for event in sub:
                if isinstance(event, ResultEvent):
                    out: JobOutput = event.result
                    self.access.record(out.manifest.key, principal, "requested")
                    yield self.response_type(result=self.result(out.manifest, cache_hit=not out.computed))
                else:
                    yield self.response_type(progress=progress_message(event.job_id, event.data))

    def _cached_progress(self, key: str) -> common_pb2.Progress:
        return common_pb2.Progress(
            job_id=key,
            stage=enum_value(common_pb2.Stage, self.stage),
            phase=common_pb2.PHASE_CACHED,
            cache_hit=True,
            message="already computed: returning the stored result",
        )

    def cancel(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The stages' Cancel RPC: stop a queued or running job for every attached caller."""
        check_digest(request.job_id, "job_id", "use Progress.job_id or Result.job_id of the job")
        job = self.jobs.get(request.job_id)
        if job is not None:
            self.access.require_cancel(job, current_principal(), self.stage)
        cancelled = self.jobs.cancel(request.job_id, "cancelled by request (Cancel)")
        message = (
            f"{self.stage} job {request.job_id[:12]} cancelled"
            if cancelled
            else f"no queued or running {self.stage} job {request.job_id[:12]} (it may have finished)"
        )
        return self.cancel_response_type(cancelled=cancelled, message=message)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new jobs with UNAVAILABLE from now on (stored results are still served)."""
        self._draining.set()

    def shutdown(self, grace: float) -> bool:
        """Drain, let running jobs finish for `grace` s, then cancel them (their callers get UNAVAILABLE)."""
        self.drain()
        return self.jobs.shutdown(grace)
