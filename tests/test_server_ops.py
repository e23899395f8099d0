"""Operating the server: configuration, `tokenflow serve`, health, reflection, /metrics, ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from loopback import stage_server
from prometheus_client.parser import text_string_to_metric_families

from services.config import SERVICES, STAGES, ServerConfig, parse_services, parse_size
from services.model_host import ModelHost
from services.server import RunningServer, config_from_args, main, parse_args
from tokenflow.synthetic import make_clip
from tokenflow_pb.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2, inversion_pb2, inversion_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
STAGE_SERVICES = ("tokenflow.v1.Inversion", "tokenflow.v1.Keyframes", "tokenflow.v1.Propagation")


# ----------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50GB", 50 * 10**9),
        ("512MiB", 512 << 20),
        ("1.5G", 1_500_000_000),
        ("40Gi", 40 << 30),
        ("2 kb", 2000),
        ("1048576", 1 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1GB", "1e9"])
def test_parse_size_rejects_nonsense_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="20GB"):
        parse_size(text)


def test_parse_services() -> None:
    assert parse_services("all") == frozenset(SERVICES)
    assert parse_services("inversion") == {"inversion", "artifacts"}
    assert parse_services(" Keyframes, propagation ,") == {"keyframes", "propagation", "artifacts"}
    with pytest.raises(ValueError, match="unknown service"):
        parse_services("inversion,upscaler")
    with pytest.raises(ValueError):
        parse_services(",")


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    config = ServerConfig()
    assert config.services == frozenset(SERVICES) and config.stages == STAGES
    assert (config.port, config.metrics_port, config.max_queue, config.job_grace_seconds) == (
        50051,
        9090,
        8,
        120,
    )
    assert config.shutdown_grace == config.job_grace_seconds
    assert config.max_upload_bytes == 2 << 30
    with pytest.raises(ValueError, match="--inversion-addr"):
        ServerConfig(services=frozenset({"editor"}), cache_dir=tmp_path)
    editor_only = ServerConfig(
        services=frozenset({"editor"}),
        inversion_addr="inv:50051",
        keyframes_addr="kf:50051",
        propagation_addr="prop:50051",
    )
    assert editor_only.stages == ()
    with pytest.raises(ValueError, match="--max-queue"):
        ServerConfig(max_queue=-1)


def test_main_rejects_bad_flags_without_starting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--cache-size", "lots", "--cache-dir", str(tmp_path)]) == 2
    assert "--cache-size" not in capsys.readouterr().out
    assert main(["--services", "editor", "--cache-dir", str(tmp_path)]) == 2
    assert "--inversion-addr" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# a running server


@pytest.fixture(scope="module")
def host() -> ModelHost:
    h = ModelHost("tiny", device="cpu")
    h.get()
    return h


def start(directory: Path, host: ModelHost | None, **overrides: Any) -> RunningServer:
    """The stage server of `loopback.stage_server`, with an ephemeral metrics port (these tests scrape it)."""
    return stage_server(directory, host, **({"metrics_port": 0} | overrides))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, host: ModelHost) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("server"), host)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_serving_for_every_registered_service(server: RunningServer, channel: grpc.Channel) -> None:
    assert set(server.service_names) == {
        "tokenflow.v1.Artifacts", *STAGE_SERVICES, "google.longrunning.Operations", "tokenflow.v1.ServerInfo"
    }  # fmt: skip
    for name in ("", *server.service_names):
        assert check(channel, name) == SERVING, name
    with pytest.raises(grpc.RpcError) as info:
        check(channel, "tokenflow.v1.Editor")  # not hosted here
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server: RunningServer, channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        *server.service_names,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    db = ProtoReflectionDescriptorDatabase(channel)
    assert db.FindFileContainingSymbol("tokenflow.v1.Inversion").name == "tokenflow/v1/inversion.proto"


def _reflect_v1(channel: grpc.Channel, request: Any) -> Any:
    """One request to grpc.reflection.v1 (the same messages as v1alpha under the v1 package name)."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=10))
    return response


def _file(data: bytes) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(data)


def test_reflection_v1_is_served_too(server: RunningServer, channel: grpc.Channel) -> None:
    listed = _reflect_v1(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    reflection_names = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert {*server.service_names, *reflection_names} <= names
    found = _reflect_v1(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="tokenflow.v1.Artifacts")
    )
    files = [_file(b) for b in found.file_descriptor_response.file_descriptor_proto]
    artifacts = next(f for f in files if f.name == "tokenflow/v1/artifacts.proto")
    assert [m.name for m in artifacts.service[0].method] == ["Upload", "Download", "Get", "List", "Delete"]
    symbol = "grpc.reflection.v1.ServerReflection"
    itself = _reflect_v1(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    (own,) = [_file(b) for b in itself.file_descriptor_response.file_descriptor_proto]
    assert own.package == "grpc.reflection.v1"


def test_a_stage_process_serves_only_its_stage(tmp_path: Path, host: ModelHost) -> None:
    running = start(tmp_path, host, services=frozenset({"inversion"}), metrics_port=None)
    try:
        assert running.service_names == (
            "tokenflow.v1.Artifacts",
            "tokenflow.v1.Inversion",
            "google.longrunning.Operations",
            "tokenflow.v1.ServerInfo",
        )
        assert running.metrics_port is None
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert check(ch, "tokenflow.v1.Inversion") == SERVING
            with pytest.raises(grpc.RpcError) as info:
                check(ch, "tokenflow.v1.Propagation")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop(grace=0)


def test_a_port_in_use_is_an_error_not_a_shared_port(tmp_path: Path, server: RunningServer) -> None:
    with pytest.raises(OSError, match="in use"):
        start(tmp_path, None, services=frozenset({"artifacts"}), port=server.port, metrics_port=None)


def test_metrics_page_has_requests_cache_and_grpc_series(
    server: RunningServer, channel: grpc.Channel, tmp_path: Path
) -> None:
    data = make_clip(tmp_path / "clip.mp4", frames=8, size=(64, 64), fps=8).read_bytes()
    header = artifacts_pb2.UploadHeader(
        kind=common_pb2.ARTIFACT_KIND_VIDEO, filename="clip.mp4", total_size=len(data)
    )
    video = (
        artifacts_pb2_grpc.ArtifactsStub(channel)
        .Upload(iter([artifacts_pb2.UploadRequest(header=header), artifacts_pb2.UploadRequest(chunk=data)]))
        .digest
    )
    stub = inversion_pb2_grpc.InversionStub(channel)
    request = inversion_pb2.InvertRequest(
        video_digest=video,
        decode=common_pb2.DecodeSpec(width=64, height=64),
        inversion=common_pb2.InversionSpec(steps=2, edit_steps=2, reconstruct=False),
    )
    assert list(stub.Invert(request, timeout=60))[-1].WhichOneof("event") == "result"
    assert list(stub.Invert(request, timeout=60))[-1].result.cache_hit
    with pytest.raises(grpc.RpcError):
        list(stub.Invert(inversion_pb2.InvertRequest(video_digest="bad"), timeout=10))

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())

    assert value("tokenflow_requests_total", service="inversion", method="Invert", outcome="ok") == 2
    assert (
        value("tokenflow_requests_total", service="inversion", method="Invert", outcome="invalid_argument")
        == 1
    )
    assert value("tokenflow_request_duration_seconds_count", service="inversion", method="Invert") == 3
    assert value("tokenflow_cache_hits_total", kind="inversion") >= 1
    assert value("tokenflow_cache_misses_total", kind="inversion") >= 1
    assert value("tokenflow_jobs_total", stage="inversion", outcome="ok") == 1
    assert value("tokenflow_denoising_steps_total", stage="inversion") == 2
    assert value("tokenflow_frames_processed_total", stage="inversion") == 8
    assert value("tokenflow_inversions_total") == 1
    assert value("tokenflow_jobs_in_flight", stage="inversion") == 0
    assert "tokenflow_jobs_queued" in samples
    assert value("grpc_server_handled_total", grpc_service="tokenflow.v1.Inversion", grpc_code="OK") == 2
    assert (
        value(
            "grpc_server_handled_total", grpc_service="tokenflow.v1.Inversion", grpc_code="INVALID_ARGUMENT"
        )
        == 1
    )
    assert (
        value("grpc_server_started_total", grpc_service="tokenflow.v1.Artifacts", grpc_method="Upload") == 1
    )


def test_the_editor_is_registered_when_asked_for(tmp_path: Path, host: ModelHost) -> None:
    pytest.importorskip("services.editor")
    running = start(tmp_path, host, services=frozenset(SERVICES), metrics_port=None)
    try:
        assert "tokenflow.v1.Editor" in running.service_names
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert check(ch, "tokenflow.v1.Editor") == SERVING
            assert "tokenflow.v1.Editor" in ProtoReflectionDescriptorDatabase(ch).get_services()
    finally:
        running.stop(grace=0)


# ----------------------------------------------------------------------------------------------------------
# `tokenflow serve` as a process


def test_tokenflow_serve_prints_its_address_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "tokenflow.cli", "serve",
        "--services", "inversion", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--cache-dir", str(tmp_path / "cache"), "--cache-size", "100MB", "--model", "tiny",
        "--device", "cpu", "--log-level", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"serving inversion,artifacts on 127\.0\.0\.1:(\d+) \(metrics :(\d+)\)\n", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        port, metrics_port = int(match.group(1)), int(match.group(2))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            # Health is truthful: SERVING once the model is loaded and warmed (bounded wait).
            deadline = time.monotonic() + 120
            while check(ch, "") != SERVING and time.monotonic() < deadline:
                time.sleep(0.2)
            assert check(ch, "") == SERVING
            assert check(ch, "tokenflow.v1.Inversion") == SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert b"tokenflow_requests_total" in response.read()
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "test model" in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_deployment_manifests_flags_parse_into_a_config() -> None:
    """Every `tokenflow serve` invocation in deploy/k8s (with the ConfigMap's values) is a valid config."""
    yaml = pytest.importorskip("yaml")
    k8s = ROOT / "deploy" / "k8s"
    if not k8s.is_dir():
        pytest.skip("no deploy/k8s in this checkout")
    # The ConfigMap is generated from config.env (kustomize configMapGenerator, a content hash in its name).
    env = dict(line.split("=", 1) for line in (k8s / "config.env").read_text().splitlines() if "=" in line)
    checked = 0
    for path in sorted(k8s.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
                # The TOKENFLOW_* variables of the ConfigMap reach every container too (envFrom).
                config = config_from_args(parse_args(args, environ=env))
                assert config.services - {"artifacts"}, path
                checked += 1
    assert checked >= 4
