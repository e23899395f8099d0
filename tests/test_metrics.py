"""Metrics: independent registries, hour-long buckets, HTTP exposition and the gRPC interceptor."""

from __future__ import annotations

import sys
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.grpc_metrics import PrometheusServerInterceptor
from services.metrics import DURATION_BUCKETS, Metrics, outcome_of

HEALTH = "grpc.health.v1.Health"
ECHO = "test.Echo"


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the registry, as a scraper would see it (exposition text, parsed)."""
    text = generate_latest(registry).decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        v for n, ls, v in samples(registry) if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Server-side bookkeeping of a cancelled stream happens on grpc's threads, slightly later."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- Metrics -------------------------------------------------------------------------------


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    assert a.registry is not b.registry
    a.requests_total.labels(service="editor", method="Edit", outcome="ok").inc(3)
    a.inversions_total.inc()
    a.cache_bytes.set(123)
    assert value(a.registry, "tokenflow_requests_total", service="editor") == 3
    assert value(b.registry, "tokenflow_requests_total", service="editor") == 0
    assert value(a.registry, "tokenflow_inversions_total") == 1
    assert value(b.registry, "tokenflow_inversions_total") == 0
    assert value(b.registry, "tokenflow_cache_bytes") == 0


def test_explicit_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    metrics.jobs_queued.labels(stage="propagation").set(2)
    assert value(registry, "tokenflow_jobs_queued", stage="propagation") == 2


def test_histogram_buckets_reach_an_hour() -> None:
    metrics = Metrics()
    assert max(DURATION_BUCKETS) == 3600
    metrics.request_seconds.labels(service="inversion", method="Invert").observe(1500)
    metrics.job_seconds.labels(stage="propagation").observe(2000)
    metrics.grpc_server_handling_seconds.labels("unary", "s", "m").observe(1)
    for name in (
        "tokenflow_request_duration_seconds_bucket",
        "tokenflow_job_duration_seconds_bucket",
        "grpc_server_handling_seconds_bucket",
    ):
        les = {float(ls["le"]) for n, ls, _ in samples(metrics.registry) if n == name}
        assert 3600.0 in les and 1800.0 in les and 0.01 in les, name
    assert value(metrics.registry, "tokenflow_request_duration_seconds_bucket", le="1800.0") == 1
    assert value(metrics.registry, "tokenflow_job_duration_seconds_bucket", le="1800.0") == 0
    assert value(metrics.registry, "tokenflow_job_duration_seconds_bucket", le="3600.0") == 1


def test_track_job_and_outcomes() -> None:
    metrics = Metrics()
    with metrics.track_job("keyframes"):
        assert value(metrics.registry, "tokenflow_jobs_in_flight", stage="keyframes") == 1
    with pytest.raises(RuntimeError), metrics.track_job("keyframes"):
        raise RuntimeError("boom")
    with metrics.track_job("keyframes") as job:
        job.outcome = "cancelled"
    r = metrics.registry
    assert value(r, "tokenflow_jobs_in_flight", stage="keyframes") == 0
    assert value(r, "tokenflow_jobs_total", stage="keyframes", outcome="ok") == 1
    assert value(r, "tokenflow_jobs_total", stage="keyframes", outcome="internal") == 1
    assert value(r, "tokenflow_jobs_total", stage="keyframes", outcome="cancelled") == 1
    assert value(r, "tokenflow_job_duration_seconds_count", stage="keyframes") == 3
    assert outcome_of(None) == "ok"
    assert outcome_of(grpc.StatusCode.RESOURCE_EXHAUSTED) == "resource_exhausted"
    assert outcome_of(grpc.StatusCode.DATA_LOSS) == "internal"  # never a new label value


def test_update_accelerator_memory_is_safe_without_cuda() -> None:
    metrics = Metrics()
    metrics.update_accelerator_memory()  # CPU-only here: must simply do nothing
    generate_latest(metrics.registry)


def test_accelerator_memory_refreshes_on_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    """With (fake) CUDA devices, every scrape reads fresh per-device memory stats."""
    used = {"value": 100}
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: used["value"] + i,
        memory_reserved=lambda i: 1000 + i,
        max_memory_allocated=lambda i: 5000 + i,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    metrics = Metrics()
    r = metrics.registry
    assert value(r, "tokenflow_accelerator_memory_bytes", device="cuda:1", kind="allocated") == 101
    used["value"] = 200
    assert value(r, "tokenflow_accelerator_memory_bytes", device="cuda:1", kind="allocated") == 201
    assert value(r, "tokenflow_accelerator_memory_bytes", device="cuda:0", kind="reserved") == 1000
    assert value(r, "tokenflow_accelerator_memory_bytes", device="cuda:0", kind="peak") == 5000


def test_serve_port_zero_exposes_parseable_page() -> None:
    metrics = Metrics()
    metrics.requests_total.labels(service="keyframes", method="Preview", outcome="ok").inc()
    metrics.cache_hits_total.labels(kind="inversion").inc(2)
    metrics.frames_processed_total.labels(stage="propagation").inc(40)
    server = metrics.serve(0, "127.0.0.1")
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        server.close()
    server.close()  # idempotent
    found = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert found["tokenflow_requests_total"].value == 1
    assert found["tokenflow_cache_hits_total"].labels == {"kind": "inversion"}
    assert found["tokenflow_frames_processed_total"].value == 40
    assert "tokenflow_cache_bytes" in found and "tokenflow_inversions_total" in found


def test_two_servers_on_free_ports() -> None:
    a, b = Metrics().serve(0, "127.0.0.1"), Metrics().serve(0, "127.0.0.1")
    try:
        assert a.port != b.port
        server, thread = a  # unpacks like prometheus_client.start_http_server
        assert thread.is_alive() and server is a.server
    finally:
        a.close()
        b.close()


# --- gRPC interceptor ----------------------------------------------------------------------


def _echo_handler() -> grpc.GenericRpcHandler:
    """All four RPC kinds on raw bytes, with abort, raise and set_code paths."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"abort":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        if request == b"raise":
            raise RuntimeError("handler bug")
        if request == b"sleep":
            time.sleep(0.5)
        return request

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(3):
            yield request + str(i).encode()
        if request == b"abort":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            if request == b"raise":
                raise ValueError("bad")
            yield request.upper()

    return grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@pytest.fixture()
def served() -> Iterator[tuple[Metrics, grpc.Channel]]:
    metrics = Metrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=[PrometheusServerInterceptor(metrics)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield metrics, channel
    finally:
        channel.close()
        server.stop(0)


def test_interceptor_health_check_codes(served: tuple[Metrics, grpc.Channel]) -> None:
    metrics, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(2):
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    r = metrics.registry
    base = {"grpc_type": "unary", "grpc_service": HEALTH, "grpc_method": "Check"}
    assert value(r, "grpc_server_started_total", **base) == 3
    assert value(r, "grpc_server_handled_total", **base, grpc_code="OK") == 2
    assert value(r, "grpc_server_handled_total", **base, grpc_code="NOT_FOUND") == 1
    assert value(r, "grpc_server_handling_seconds_count", **base) == 3
    assert value(r, "grpc_server_msg_received_total", **base) == 3
    assert value(r, "grpc_server_msg_sent_total", **base) == 2


def test_interceptor_health_watch_stream(served: tuple[Metrics, grpc.Channel]) -> None:
    metrics, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    base = {"grpc_type": "server_stream", "grpc_service": HEALTH, "grpc_method": "Watch"}
    r = metrics.registry
    assert value(r, "grpc_server_started_total", **base) == 1
    assert value(r, "grpc_server_msg_sent_total", **base) == 1
    assert value(r, "grpc_server_handled_total", **base) == 0  # still open
    stream.cancel()
    wait_for(lambda: value(r, "grpc_server_handled_total", **base) == 1)
    assert value(r, "grpc_server_handled_total", **base, grpc_code="CANCELLED") == 1
    assert value(r, "grpc_server_handling_seconds_count", **base) == 1


def test_interceptor_all_rpc_kinds(served: tuple[Metrics, grpc.Channel]) -> None:
    metrics, channel = served
    r = metrics.registry
    unary = channel.unary_unary(f"/{ECHO}/Unary")
    server_stream = channel.unary_stream(f"/{ECHO}/ServerStream")
    client_stream = channel.stream_unary(f"/{ECHO}/ClientStream")
    bidi = channel.stream_stream(f"/{ECHO}/Bidi")

    def handled(method: str, code: str) -> float:
        return value(r, "grpc_server_handled_total", grpc_service=ECHO, grpc_method=method, grpc_code=code)

    def count(name: str, method: str, kind: str) -> float:
        return value(r, name, grpc_type=kind, grpc_service=ECHO, grpc_method=method)

    # unary/unary: ok, abort (code set, exception raised), uncaught exception, deadline.
    assert unary(b"hi", timeout=5) == b"hi"
    for request, code in ((b"abort", grpc.StatusCode.INVALID_ARGUMENT), (b"raise", grpc.StatusCode.UNKNOWN)):
        with pytest.raises(grpc.RpcError) as err:
            unary(request, timeout=5)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        unary(b"sleep", timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: handled("Unary", "DEADLINE_EXCEEDED") == 1)
    assert handled("Unary", "OK") == 1
    assert handled("Unary", "INVALID_ARGUMENT") == 1
    assert handled("Unary", "UNKNOWN") == 1
    assert count("grpc_server_started_total", "Unary", "unary") == 4

    # unary/stream: three messages then OK; three then abort mid-stream.
    assert list(server_stream(b"x", timeout=5)) == [b"x0", b"x1", b"x2"]
    with pytest.raises(grpc.RpcError) as err:
        list(server_stream(b"abort", timeout=5))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert handled("ServerStream", "OK") == 1
    assert handled("ServerStream", "RESOURCE_EXHAUSTED") == 1
    assert count("grpc_server_msg_sent_total", "ServerStream", "server_stream") == 6
    assert count("grpc_server_msg_received_total", "ServerStream", "server_stream") == 2

    # stream/unary: request messages counted as the handler reads them.
    assert client_stream(iter([b"a", b"b", b"c", b"d"]), timeout=5) == b"abcd"
    assert handled("ClientStream", "OK") == 1
    assert count("grpc_server_msg_received_total", "ClientStream", "client_stream") == 4
    assert count("grpc_server_msg_sent_total", "ClientStream", "client_stream") == 1

    # stream/stream: echo, then an exception inside the response generator.
    assert list(bidi(iter([b"a", b"b"]), timeout=5)) == [b"A", b"B"]
    with pytest.raises(grpc.RpcError) as err:
        list(bidi(iter([b"a", b"raise"]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert handled("Bidi", "OK") == 1
    assert handled("Bidi", "UNKNOWN") == 1
    assert count("grpc_server_started_total", "Bidi", "bidi_stream") == 2
    assert count("grpc_server_msg_received_total", "Bidi", "bidi_stream") == 4
    assert count("grpc_server_msg_sent_total", "Bidi", "bidi_stream") == 3
    assert count("grpc_server_handling_seconds_count", "Bidi", "bidi_stream") == 2


def test_unknown_method_is_not_counted(served: tuple[Metrics, grpc.Channel]) -> None:
    metrics, channel = served
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/no.Such/Method")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert value(metrics.registry, "grpc_server_started_total") == 0


def test_request_metrics_cover_every_rpc_artifacts_included(tmp_path: Path) -> None:
    """One interceptor records every RPC of our services: the standard grpc_server_* series and
    tokenflow_requests_total, whatever the outcome, for Artifacts as for the stages."""
    from services.config import ServerConfig
    from services.server import build_server
    from tokenflow_pb.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2

    config = ServerConfig(
        services=frozenset({"artifacts"}),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        cache_dir=tmp_path / "cache",
        cache_size_bytes=64 << 20,
        preload_model=False,
    )
    running = build_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = artifacts_pb2_grpc.ArtifactsStub(channel)
        header = artifacts_pb2.UploadHeader(
            kind=common_pb2.ARTIFACT_KIND_VIDEO, filename="a.mp4", total_size=3
        )
        ref = stub.Upload(
            iter([artifacts_pb2.UploadRequest(header=header), artifacts_pb2.UploadRequest(chunk=b"abc")]),
            timeout=10,
        )
        assert stub.Get(artifacts_pb2.GetRequest(digest=ref.digest), timeout=10).artifact.digest == ref.digest
        for digest in ("0" * 64, "bad"):
            with pytest.raises(grpc.RpcError):
                stub.Get(artifacts_pb2.GetRequest(digest=digest), timeout=10)
        assert b"abc" == b"".join(
            m.chunk for m in stub.Download(artifacts_pb2.DownloadRequest(digest=ref.digest), timeout=10)
        )
        r = running.metrics.registry
        ours = {"service": "artifacts"}
        wait_for(lambda: value(r, "tokenflow_requests_total", **ours) == 5)
        assert value(r, "tokenflow_requests_total", **ours, method="Upload", outcome="ok") == 1
        assert value(r, "tokenflow_requests_total", **ours, method="Get", outcome="ok") == 1
        assert value(r, "tokenflow_requests_total", **ours, method="Get", outcome="not_found") == 1
        assert value(r, "tokenflow_requests_total", **ours, method="Get", outcome="invalid_argument") == 1
        assert value(r, "tokenflow_requests_total", **ours, method="Download", outcome="ok") == 1
        assert value(r, "tokenflow_request_duration_seconds_count", **ours) == 5
        standard = {"grpc_service": "tokenflow.v1.Artifacts", "grpc_method": "Get"}
        assert value(r, "grpc_server_handled_total", **standard, grpc_code="NOT_FOUND") == 1
        assert value(r, "grpc_server_handled_total", **standard, grpc_code="INVALID_ARGUMENT") == 1
    finally:
        channel.close()
        running.stop(grace=0)
