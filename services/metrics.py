"""Prometheus metrics for the TokenFlow services, with no global state.

Every ``Metrics`` owns its own ``CollectorRegistry``: tests and the single-process
"all services" mode can build as many as they like without "Duplicated timeseries"
errors, and nothing leaks between servers through ``prometheus_client.REGISTRY``.

Naming follows Prometheus conventions (``tokenflow_..._seconds``, ``..._bytes``,
``..._total``). Label values are always drawn from small, fixed sets: a service or
stage name, an RPC method name, an outcome (``ok``, ``invalid_argument``,
``not_found``, ``resource_exhausted``, ``failed_precondition``, ``unavailable``,
``cancelled``, ``deadline_exceeded``, ``internal``), an artifact kind, a device.
Labels never contain prompts, digests, artifact keys, file names or anything else a
client controls: each distinct label value is a new time series kept forever.

Duration histograms use buckets reaching one hour because jobs take minutes; the
client library's default buckets stop at 10 s and would put every job in ``+Inf``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "Metrics",
    "MetricsServer",
    "outcome_of",
]

#: Seconds; from a fast cache hit (10 ms) to a full-length propagation job (1 h).
DURATION_BUCKETS: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)

#: The outcome label values the services use (lower-case gRPC status names).
OUTCOMES: tuple[str, ...] = (
    "ok",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
    "failed_precondition",
    "unavailable",
    "cancelled",
    "deadline_exceeded",
    "aborted",
    "unauthenticated",
    "permission_denied",
    "internal",
)


#: How a propagation batch had the source branch's contributions (tokenflow.editing.PATH_*).
FEATURE_PATHS: tuple[str, ...] = ("source_branch", "features")
#: What a TokenFlow edit did with source features.
FEATURE_OUTCOMES: tuple[str, ...] = ("recorded", "replayed", "over_budget", "off", "precomputed")
#: What was done with source features' bytes (tokenflow_features_bytes_total{action}).
FEATURE_ACTIONS: tuple[str, ...] = ("recorded", "replayed", "precomputed")


def outcome_of(code: Any) -> str:
    """Outcome label for a ``grpc.StatusCode`` (or None meaning OK): its lower-case name.

    Duck-typed on ``.name`` so this module does not need grpc; unknown values collapse
    to ``internal`` so a bug can never create new label values.
    """
    if code is None:
        return "ok"
    name = str(getattr(code, "name", code)).lower()
    return name if name in OUTCOMES else "internal"


class _AcceleratorRefresher(Collector):
    """Refreshes the accelerator gauges at scrape time so they are never stale.

    Registered before the gauge it refreshes (the registry collects in registration
    order), yields nothing itself. Only acts if torch is already imported: a scrape
    must not pay for importing torch in a process that never needed it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if "torch" in sys.modules:
            with contextlib.suppress(Exception):  # a scrape must never fail because of CUDA
                self._metrics.update_accelerator_memory()
        return []


class Metrics:
    """All metrics of one server process, registered on one registry.

    Attribute names are the public API the services code against; do not rename.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        b = DURATION_BUCKETS

        # Requests and jobs.
        self.requests_total = Counter(
            "tokenflow_requests_total",
            "RPCs handled, by outcome.",
            ["service", "method", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "tokenflow_request_duration_seconds",
            "RPC wall time in seconds (streams: until the last message).",
            ["service", "method"],
            buckets=b,
            registry=r,
        )
        self.job_seconds = Histogram(
            "tokenflow_job_duration_seconds",
            "Wall time of computed jobs in seconds, excluding queueing.",
            ["stage"],
            buckets=b,
            registry=r,
        )
        self.jobs_in_flight = Gauge(
            "tokenflow_jobs_in_flight", "Jobs computing right now.", ["stage"], registry=r
        )
        self.jobs_queued = Gauge("tokenflow_jobs_queued", "Jobs waiting for a worker.", ["stage"], registry=r)
        self.jobs_total = Counter(
            "tokenflow_jobs_total",
            "Jobs actually computed (not cache hits), by outcome.",
            ["stage", "outcome"],
            registry=r,
        )
        self.denoising_steps_total = Counter(
            "tokenflow_denoising_steps_total", "Diffusion (or inversion) steps run.", ["stage"], registry=r
        )
        self.frames_processed_total = Counter(
            "tokenflow_frames_processed_total",
            "Video frames processed by computed jobs.",
            ["stage"],
            registry=r,
        )
        self.inversions_total = Counter(
            "tokenflow_inversions_total",
            "DDIM inversions actually computed (not served from cache).",
            registry=r,
        )

        # Artifact cache, by artifact kind.
        self.cache_hits_total = Counter(
            "tokenflow_cache_hits_total", "Artifact lookups served from the cache.", ["kind"], registry=r
        )
        self.cache_misses_total = Counter(
            "tokenflow_cache_misses_total", "Artifact lookups not in the cache.", ["kind"], registry=r
        )
        self.cache_written_bytes_total = Counter(
            "tokenflow_cache_written_bytes_total", "Bytes written to the cache.", ["kind"], registry=r
        )
        self.cache_read_bytes_total = Counter(
            "tokenflow_cache_read_bytes_total", "Bytes read from the cache.", ["kind"], registry=r
        )
        self.cache_evictions_total = Counter(
            "tokenflow_cache_evictions_total",
            "Entries evicted to respect the size limit.",
            ["kind"],
            registry=r,
        )
        self.cache_corrupt_total = Counter(
            "tokenflow_cache_corrupt_total",
            "Entries that failed size or digest verification (treated as misses).",
            ["kind"],
            registry=r,
        )
        self.cache_bytes = Gauge("tokenflow_cache_bytes", "Current size of the cache on disk.", registry=r)
        self.store_writable = Gauge(
            "tokenflow_store_writable",
            "1 while the store can write, 0 while it cannot (a full disk: health is NOT_SERVING).",
            registry=r,
        )
        self.store_write_failures_total = Counter(
            "tokenflow_store_write_failures_total",
            "Times the store found it could not write (disk full, quota) and turned unhealthy.",
            registry=r,
        )

        # Standard gRPC server metrics (go-grpc-prometheus names), fed by
        # services.grpc_metrics.PrometheusServerInterceptor. Kept here so they are
        # registered once per registry however many interceptors share it.
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_server_started_total = Counter(
            "grpc_server_started_total", "RPCs started on the server.", rpc, registry=r
        )
        self.grpc_server_handled_total = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*rpc, "grpc_code"],
            registry=r,
        )
        self.grpc_server_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC handling time in seconds until the status is sent.",
            rpc,
            buckets=b,
            registry=r,
        )
        self.grpc_server_msg_received_total = Counter(
            "grpc_server_msg_received_total", "Stream messages received by the server.", rpc, registry=r
        )
        self.grpc_server_msg_sent_total = Counter(
            "grpc_server_msg_sent_total", "Stream messages sent by the server.", rpc, registry=r
        )

        # Memory. The refresher must be registered before the gauge it refreshes.
        self._accelerator_refresher = _AcceleratorRefresher(self)
        r.register(self._accelerator_refresher)
        self.accelerator_memory_bytes = Gauge(
            "tokenflow_accelerator_memory_bytes",
            "Accelerator memory by device and kind (allocated, reserved, peak).",
            ["device", "kind"],
            registry=r,
        )
        # Fleet: readiness and failover (services/server_info.py, services/editor.py).
        self.model_ready = Gauge(
            "tokenflow_model_ready",
            "1 when the model is loaded and warmed (the stages can serve), else 0.",
            registry=r,
        )
        self.model_load_failures_total = Counter(
            "tokenflow_model_load_failures_total",
            "Failed model loads (the reason is in the log and in ServerInfo).",
            registry=r,
        )
        self.service_serving = Gauge(
            "tokenflow_service_serving",
            "1 while a hosted service reports SERVING on grpc.health.v1, else 0.",
            ["service"],
            registry=r,
        )
        self.stage_failovers_total = Counter(
            "tokenflow_stage_failovers_total",
            "Editor: stage calls re-submitted to another replica, by stage and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.lease_waits_total = Counter(
            "tokenflow_lease_waits_total",
            "Jobs that waited on another replica's lease instead of computing (services/leasing.py).",
            ["stage"],
            registry=r,
        )
        self.lease_takeovers_total = Counter(
            "tokenflow_lease_takeovers_total",
            "Jobs taken over from another replica whose lease expired or that gave up without a result.",
            ["stage"],
            registry=r,
        )
        # Source features (tokenflow/features.py, services/propagation.py).
        self.propagation_batches_total = Counter(
            "tokenflow_propagation_batches_total",
            "Propagation-pass UNet batches, by how the source branch's contributions were had: "
            "source_branch (it ran) or features (stored source features, no source branch).",
            ["path"],
            registry=r,
        )
        self.features_total = Counter(
            "tokenflow_features_total",
            "TokenFlow edits by what they did with source features: recorded, replayed, over_budget "
            "(too large to record), off (the request or the server turned them off); precomputed: "
            "recorded ahead by an Invert with features_for (one too large counts as over_budget).",
            ["outcome"],
            registry=r,
        )
        self.features_bytes_total = Counter(
            "tokenflow_features_bytes_total",
            "Bytes of source features recorded (published) or replayed by edits, or precomputed by "
            "Invert (the artifacts' sizes).",
            ["action"],
            registry=r,
        )
        self.process_memory = ProcessCollector(registry=r)
        self.platform = PlatformCollector(registry=r)

    def initialise(
        self,
        rpcs: Iterable[tuple[str, str, str]] = (),
        stages: Iterable[str] = (),
        kinds: Iterable[str] = (),
    ) -> None:
        """Create every known label set at zero, at start-up.

        A series that appears only with its first event defeats `rate()` and `increase()` alerts: the first
        cache corruption or the first failed job would never fire one. `rpcs` are (grpc_type, full service
        name, method) of every hosted RPC; `stages` the stage labels; `kinds` the artifact kinds.
        """
        for grpc_type, service, method in rpcs:
            short = service.rsplit(".", 1)[-1].lower()
            rpc = (grpc_type, service, method)
            self.grpc_server_started_total.labels(*rpc)
            self.grpc_server_handling_seconds.labels(*rpc)
            self.grpc_server_msg_received_total.labels(*rpc)
            self.grpc_server_msg_sent_total.labels(*rpc)
            self.request_seconds.labels(service=short, method=method)
            for outcome in OUTCOMES:
                self.requests_total.labels(service=short, method=method, outcome=outcome)
                self.grpc_server_handled_total.labels(*rpc, "OK" if outcome == "ok" else outcome.upper())
        for stage in stages:
            self.job_seconds.labels(stage=stage)
            self.jobs_in_flight.labels(stage=stage)
            self.jobs_queued.labels(stage=stage)
            self.denoising_steps_total.labels(stage=stage)
            self.frames_processed_total.labels(stage=stage)
            self.lease_waits_total.labels(stage=stage)
            self.lease_takeovers_total.labels(stage=stage)
            for outcome in OUTCOMES:
                self.jobs_total.labels(stage=stage, outcome=outcome)
        for path in FEATURE_PATHS:
            self.propagation_batches_total.labels(path=path)
        for outcome in FEATURE_OUTCOMES:
            self.features_total.labels(outcome=outcome)
        for action in FEATURE_ACTIONS:
            self.features_bytes_total.labels(action=action)
        for kind in kinds:
            for counter in (
                self.cache_hits_total,
                self.cache_misses_total,
                self.cache_written_bytes_total,
                self.cache_read_bytes_total,
                self.cache_evictions_total,
                self.cache_corrupt_total,
            ):
                counter.labels(kind=kind)

    def update_accelerator_memory(self) -> None:
        """Read torch.cuda memory stats of every visible device into the gauge; no-op without CUDA.

        torch is imported lazily so the metrics module stays cheap for CPU-only tools.
        """
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            g = self.accelerator_memory_bytes
            g.labels(device=device, kind="allocated").set(torch.cuda.memory_allocated(index))
            g.labels(device=device, kind="reserved").set(torch.cuda.memory_reserved(index))
            g.labels(device=device, kind="peak").set(torch.cuda.max_memory_allocated(index))

    def observe_request(self, service: str, method: str, outcome: str, seconds: float) -> None:
        """Record one finished RPC in ``requests_total`` and ``request_seconds``."""
        self.requests_total.labels(service=service, method=method, outcome=outcome).inc()
        self.request_seconds.labels(service=service, method=method).observe(seconds)

    @contextlib.contextmanager
    def track_job(self, stage: str) -> Iterator[JobTracker]:
        """Count a computed job: in flight while inside, then its duration and outcome.

        The outcome is ``ok`` unless the body sets ``tracker.outcome`` or raises (then
        ``internal`` unless it was set). Use only for jobs actually computed, not cache hits.
        """
        tracker = JobTracker()
        in_flight = self.jobs_in_flight.labels(stage=stage)
        in_flight.inc()
        start = time.perf_counter()
        try:
            yield tracker
        except BaseException:
            if tracker.outcome == "ok":
                tracker.outcome = "internal"
            raise
        finally:
            in_flight.dec()
            self.job_seconds.labels(stage=stage).observe(time.perf_counter() - start)
            self.jobs_total.labels(stage=stage, outcome=tracker.outcome).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` for this registry on a daemon thread; port 0 picks a free port."""
        httpd, thread = start_http_server(port, addr, registry=self.registry)
        return MetricsServer(server=httpd, thread=thread, port=int(httpd.server_port))


@dataclass
class JobTracker:
    """Mutable outcome of a job inside ``Metrics.track_job``."""

    outcome: str = "ok"


@dataclass
class MetricsServer:
    """A running metrics HTTP endpoint; ``port`` is the bound port (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread
    port: int
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``(server, thread)`` like ``prometheus_client.start_http_server``."""
        return iter((self.server, self.thread))

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
