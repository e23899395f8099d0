"""Hostile input through a real server process (`tokenflow serve --model tiny` on loopback).

Every case gets the right status with details naming the limit or field, never INTERNAL, and the server
is healthy after all of them, with its peak memory within 300 MB of its resident size at the start.
The inputs come from fuzz.hostile_inputs (one definition per hostile clip, shared with the library's
tests and the fuzzers' corpus).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from fuzz import hostile_inputs as hostile
from tests.rpc_client import Client, status_of, vm_kb
from tests.serve_process import ServeProcess
from tokenflow.synthetic import make_clip
from tokenflow_pb.v1 import artifacts_pb2, common_pb2, keyframes_pb2

MAX_DECODED_FRAMES = 500
IDLE_SECONDS = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("hostile-server")
    process = ServeProcess(
        "hostile",
        [
            "--model", "tiny", "--cache-dir", str(tmp / "cache"), "--metrics-port", "-1",
            "--max-decoded-frames", str(MAX_DECODED_FRAMES), "--upload-idle-seconds", str(IDLE_SECONDS),
        ],
        tmp,
    )  # fmt: skip
    try:
        process.wait_serving()
        client = Client(process.target)
        deadline = time.monotonic() + 120
        while client.health_seconds()[0] != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the server never turned SERVING"
            time.sleep(0.2)
        process.baseline_rss_kb = vm_kb(process.process.pid, "VmRSS")  # type: ignore[attr-defined]
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> Client:
    return Client(server.target)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=6, size=(64, 64), fps=10, audio=False
    )
    return path.read_bytes()


def assert_invalid_video(client: Client, data: bytes, filename: str = "clip.mp4") -> str:
    digest = client.upload(data, filename)
    code, reason, _, _ = client.refused(lambda: client.invert(digest))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_VIDEO", (code, reason)
    return digest


def assert_limit(status: tuple[grpc.StatusCode, str, dict, list], limit_name: str) -> None:
    code, reason, metadata, others = status
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "INPUT_TOO_LARGE", status
    assert metadata["limit_name"] == limit_name and int(metadata["limit"]) > 0, metadata
    quota = [o for o in others if isinstance(o, error_details_pb2.QuotaFailure)]
    assert quota and quota[0].violations[0].subject == limit_name


# --------------------------------------------------------------------------- hostile videos


def test_not_videos(client: Client, clip: bytes) -> None:
    assert_invalid_video(client, hostile.random_bytes(50_000, seed=1), "random.bin")
    assert_invalid_video(client, hostile.truncated(clip, 0.3))
    assert_invalid_video(client, hostile.audio_only(), "audio.mp4")
    assert_invalid_video(client, hostile.encode(0), "zero.mp4")


def test_bit_flipped_mp4_is_refused_or_inverted(client: Client, clip: bytes) -> None:
    """Flipped bits may leave a decodable clip (it is inverted) or not (INVALID_VIDEO): never INTERNAL."""
    for seed in range(3):
        digest = client.upload(hostile.bit_flipped(clip, flips=40, seed=seed, skip=64))
        try:
            result = client.invert(digest)
        except grpc.RpcError as e:
            code, reason, _, _ = status_of(e)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_VIDEO", (code, reason)
        else:
            assert result.digest


def test_decode_limits_are_named(client: Client) -> None:
    switching = client.upload(hostile.switching_mp4(16000, 16000))
    assert_limit(client.refused(lambda: client.invert(switching)), "max_pixels_per_frame")
    huge = client.upload(hostile.y4m(20000, 20000), "huge.y4m")
    status = client.refused(lambda: client.invert(huge))
    assert_limit(status, "max_pixels_per_frame")
    many = client.upload(hostile.claiming_frames(10**7), "claims.mp4")
    assert_limit(client.refused(lambda: client.invert(many, max_frames=0)), "max_decoded_frames")


def test_a_long_clip_without_a_count_is_refused_before_queuing(client: Client) -> None:
    digest = client.upload(hostile.encode(1000, (64, 64), fmt="h264", still=True), "long.h264")
    started = time.monotonic()
    status = client.refused(lambda: client.invert(digest, max_frames=0))
    assert_limit(status, "max_decoded_frames")
    assert status[2]["limit"] == str(MAX_DECODED_FRAMES)
    assert time.monotonic() - started < 10  # refused by the probe: no job ran


# --------------------------------------------------------------------------- requests


def test_absurd_specs_and_digests(client: Client, clip: bytes) -> None:
    digest = client.upload(clip)
    code, reason, _, others = client.refused(lambda: client.invert(digest, steps=10**9))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_SPEC"
    assert any(isinstance(o, error_details_pb2.BadRequest) for o in others)
    code, _, _, _ = client.refused(lambda: client.invert(digest, prompt="x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for bad in ("../../etc/passwd", "/etc/passwd", "A" * 64, "0" * 63, ""):
        code, _, _, _ = client.refused(lambda bad=bad: client.invert(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
        code, _, _, _ = client.refused(
            lambda bad=bad: client.artifacts.Get(artifacts_pb2.GetRequest(digest=bad), timeout=10)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
    code, reason, _, _ = client.refused(lambda: client.invert("ab" * 32))
    assert code == grpc.StatusCode.NOT_FOUND and reason == "ARTIFACT_NOT_FOUND"


def test_keyframes_validates_the_schedule(client: Client, clip: bytes) -> None:
    inversion = client.invert(client.upload(clip)).digest
    rows = [common_pb2.KeyframeRow(frames=[0, 1, 2, 3]) for _ in range(20_000)]
    request = keyframes_pb2.EditKeyframesRequest(
        inversion_digest=inversion, edit=common_pb2.EditSpec(prompt="a fox", keyframe_schedule=rows)
    )
    code, reason, metadata, _ = client.refused(lambda: client.keyframes.EditKeyframes(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata.get("field") == "edit.keyframe_schedule"


def test_unparseable_requests_are_invalid_argument(client: Client) -> None:
    for method in ("/tokenflow.v1.Artifacts/Get", "/tokenflow.v1.Inversion/Invert"):
        stub = client.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            result = stub(b"\xff\xff\xff\xff garbage \x0a\xff", timeout=10)
            list(result) if isinstance(result, Iterator) else None
        code, reason, _, _ = status_of(info.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "MALFORMED_REQUEST", (method, code)
    stream = client.channel.stream_unary("/tokenflow.v1.Artifacts/Upload", None, None)
    with pytest.raises(grpc.RpcError) as info:
        stream(iter([b"\xff\xfe garbage"]), timeout=10)
    assert status_of(info.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


# --------------------------------------------------------------------------- stalled uploads


def _stalled_upload(client: Client, release: threading.Event, outcomes: list) -> None:
    def requests() -> Iterator[artifacts_pb2.UploadRequest]:
        yield artifacts_pb2.UploadRequest(
            header=artifacts_pb2.UploadHeader(kind=common_pb2.ARTIFACT_KIND_VIDEO, filename="slow.mp4")
        )
        yield artifacts_pb2.UploadRequest(chunk=b"x" * 1000)
        release.wait(60)  # stalls: sends nothing more, never closes

    try:
        client.artifacts.Upload(requests(), timeout=60)
        outcomes.append(("ok", ""))
    except grpc.RpcError as e:
        code, reason, _, _ = status_of(e)
        outcomes.append((code.name, reason))


def test_a_stalled_upload_is_closed(client: Client, server: ServeProcess) -> None:
    release, outcomes = threading.Event(), []
    started = time.monotonic()
    worker = threading.Thread(target=_stalled_upload, args=(client, release, outcomes))
    worker.start()
    time.sleep(IDLE_SECONDS + 2)
    release.set()  # now the client's own request stream ends and it reads the status
    worker.join(30)
    # grpc's Python client reports a status only after its request stream ended; the server closed
    # the call at the idle limit (UPLOAD_STALLED), or cancelled it to free the thread (CANCELLED).
    assert outcomes and outcomes[0][0] in ("RESOURCE_EXHAUSTED", "CANCELLED"), outcomes
    assert outcomes[0][1] in ("UPLOAD_STALLED", ""), outcomes
    assert time.monotonic() - started < IDLE_SECONDS + 10
    assert "closing an upload idle" in server.log_path.read_text()


def test_100_stalled_uploads_leave_health_answering(client: Client) -> None:
    release, outcomes = threading.Event(), []
    clients = [Client(client.target) for _ in range(4)]  # several connections
    workers = [
        threading.Thread(target=_stalled_upload, args=(clients[i % 4], release, outcomes), daemon=True)
        for i in range(100)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # every upload is in: admitted ones hold a handler thread, the rest were refused
    latencies = []
    for _ in range(10):
        status, seconds = client.health_seconds()
        assert status == health_pb2.HealthCheckResponse.SERVING
        latencies.append(seconds)
        time.sleep(0.1)
    assert max(latencies) < 1.0, latencies
    busy = [o for o in outcomes if o[1] == "SERVER_BUSY"]
    assert busy, "beyond max-concurrent-rpcs (max-workers - 8) an upload is refused at once"
    time.sleep(IDLE_SECONDS + 1.5)
    release.set()
    for w in workers:
        w.join(30)
    assert len(outcomes) == 100
    assert {o[0] for o in outcomes} <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, set(outcomes)
    assert client.health_seconds()[0] == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- after everything


def test_zz_healthy_and_bounded_after_the_suite(client: Client, server: ServeProcess, clip: bytes) -> None:
    assert client.health_seconds()[0] == health_pb2.HealthCheckResponse.SERVING
    assert client.invert(client.upload(clip), max_frames=3).digest  # still does its work
    peak_mb = vm_kb(server.process.pid, "VmHWM") / 1024
    baseline_mb = server.baseline_rss_kb / 1024  # type: ignore[attr-defined]
    assert peak_mb - baseline_mb < 300, (peak_mb, baseline_mb)
    log = server.log_path.read_text()
    assert "internal error" not in log, log[-3000:]
