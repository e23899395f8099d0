"""What the three stage servicers (Inversion, Keyframes, Propagation) share.

Every stage RPC follows one order, so every stage behaves the same for callers:

1. validate the request and turn proto specs into library specs (bad input -> INVALID_ARGUMENT);
2. compute the content address of the result (inputs' digests, specs, model fingerprint);
3. a stored result is returned at once (`cache_hit`);
4. otherwise the inputs are checked (NOT_FOUND before a queue slot is taken) and the job is submitted to
   the stage's `JobManager`, which dedupes identical requests in flight (same key -> same job, so a
   caller who reconnects re-attaches) and bounds the queue (RESOURCE_EXHAUSTED);
5. the caller streams the job's progress and then its result. A caller who leaves (deadline, cancel,
   dropped connection) only detaches: the job keeps running for the grace period, for a re-attach.

Servicers raise; services.errors.ErrorInterceptor maps exceptions to statuses for every RPC.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from services.convert import artifact_kind, enum_value, progress_message
from services.errors import outcome_for
from services.jobs import JobContext, JobManager, ResultEvent, ShuttingDown
from services.metrics import Metrics
from services.model_host import ModelHost
from services.store import ArtifactStore, Manifest, is_digest
from tokenflow.errors import SpecError
from tokenflow.progress import JobHooks
from tokenflow.progress import ProgressEvent as LibraryProgress
from tokenflow_pb.v1 import common_pb2

log = logging.getLogger(__name__)

LOW_PSNR_DB = 25.0
"""Below this reconstruction PSNR a clip inverts poorly and edits may not follow the source."""
_STEP_PHASES = frozenset({"invert", "reconstruct", "edit", "keyframes"})
"""Library phases whose steps are UNet (denoising or inversion) steps."""


# ----------------------------------------------------------------------------------------------------------
# request checks


def check_digest(value: str, what: str, hint: str) -> str:
    """Reject a malformed content address with a message saying where a good one comes from."""
    if not is_digest(value):
        raise SpecError(
            f"{what} {value[:80]!r} is not a digest: expected 64 lowercase hex characters; {hint}", field=what
        )
    return value


def model_meta(host: ModelHost) -> dict[str, Any]:
    """The model part of every artifact's metadata (the Result reports it)."""
    model = host.get()
    return {"model": model.fingerprint, "model_name": model.name, "test_model": bool(model.is_test_model)}


def common_warnings(meta: Mapping[str, Any], psnr_key: str) -> list[str]:
    """Warnings every Result repeats: test model, poor inversion."""
    out = []
    if meta.get("test_model"):
        out.append(
            f"test model: made with {meta.get('model_name', 'a test model')!r}, random weights, "
            "so the pictures are noise (serve a real Stable Diffusion folder with --model)"
        )
    psnr = meta.get(psnr_key)
    if isinstance(psnr, (int, float)) and psnr < LOW_PSNR_DB:
        out.append(
            f"reconstruction PSNR is low ({psnr:.1f} dB < {LOW_PSNR_DB:g} dB): the clip inverts poorly and "
            "the edit may not follow the source; try more inversion steps or a caption as inversion prompt"
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class JobOutput:
    """What a stage job returns: the published artifact, and whether this job computed it."""

    manifest: Manifest
    computed: bool


def already_stored(store: ArtifactStore, key: str, kind: str) -> JobOutput | None:
    """A job's first step: the result may have been published since the caller looked (counted once).

    `contains` first, so the caller's miss is not counted twice in the cache metrics.
    """
    if not store.contains(key):
        return None
    stored = store.get(key, kind=kind)
    return JobOutput(stored.manifest, computed=False) if stored is not None else None


def finite_or_none(value: float | None) -> float | None:
    """JSON metadata allows no NaN/inf (a perfect reconstruction has an infinite PSNR)."""
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Plan:
    """A validated request: the key of its result, a pre-flight input check, and the job function."""

    key: str
    precheck: Callable[[], None]
    run: Callable[[JobContext], JobOutput]


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
        fraction = self._done_weight
        if event.total:
            fraction += self._weights.get(phase, 0.0) * min(1.0, event.step / event.total)
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
        if 0.01 <= fraction < 1.0:
            data["eta_seconds"] = elapsed * (1.0 - fraction) / fraction
        self._ctx.report(data)

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


# ----------------------------------------------------------------------------------------------------------
# the servicer base


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

    def stream(
        self, method: str, context: grpc.ServicerContext, plan: Callable[[], Plan]
    ) -> Iterator[Any]:
        """Run the request flow of the module docstring, yielding `response_type` events.

        Errors are raised; services.errors.ErrorInterceptor turns them into statuses and records the
        request metrics (`method` names the RPC in logs only).
        """
        p = plan()
        stored = self.store.get(p.key, kind=self.kind)
        if stored is not None:
            yield self.response_type(progress=self._cached_progress(p.key))
            yield self.response_type(result=self.result(stored.manifest, cache_hit=True))
            return
        if self._draining.is_set():
            raise ShuttingDown(f"the {self.stage} service is shutting down; retry on another replica")
        if self.jobs.get(p.key) is None:  # a running job already passed its pre-flight check
            p.precheck()
        job = self.jobs.submit(p.key, p.run)
        with job.subscribe(is_active=context.is_active) as sub:
            context.add_callback(sub.close)
            for event in sub:
                if isinstance(event, ResultEvent):
                    out: JobOutput = event.result
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
