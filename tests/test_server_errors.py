"""Every error class a stage can answer, on a real server: the right status, a message a person can act
on, no partial artifact, and a server that still answers health afterwards."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from loopback import stage_server as start

from services.config import STAGES
from services.model_host import ModelHost
from services.server import RunningServer
from tokenflow.keys import inversion_key
from tokenflow.specs import DecodeSpec, InversionSpec
from tokenflow.synthetic import make_clip
from tokenflow_pb.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    inversion_pb2,
    inversion_pb2_grpc,
    keyframes_pb2,
    keyframes_pb2_grpc,
    propagation_pb2,
    propagation_pb2_grpc,
)

DECODE = common_pb2.DecodeSpec(width=64, height=64)
INVERSION = common_pb2.InversionSpec(steps=4, edit_steps=2)
UNKNOWN = "0" * 64
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Client:
    def __init__(self, server: RunningServer) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.artifacts = artifacts_pb2_grpc.ArtifactsStub(self.channel)
        self.inversion = inversion_pb2_grpc.InversionStub(self.channel)
        self.keyframes = keyframes_pb2_grpc.KeyframesStub(self.channel)
        self.propagation = propagation_pb2_grpc.PropagationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def upload(self, data: bytes, filename: str = "clip.mp4") -> str:
        header = artifacts_pb2.UploadHeader(
            kind=common_pb2.ARTIFACT_KIND_VIDEO, filename=filename, total_size=len(data)
        )
        requests = [artifacts_pb2.UploadRequest(header=header), artifacts_pb2.UploadRequest(chunk=data)]
        return self.artifacts.Upload(iter(requests), timeout=30).digest

    def invert(self, video: str, inversion: common_pb2.InversionSpec = INVERSION, **kw: Any) -> Any:
        request = inversion_pb2.InvertRequest(video_digest=video, decode=DECODE, inversion=inversion)
        return self.inversion.Invert(request, **kw)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()


@dataclass
class Details:
    """The google.rpc.Status details of a failed call, decoded the way a caller decodes them."""

    code: int
    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    fields: list[str] = field(default_factory=list)


def details_of(error: grpc.RpcError) -> Details:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no status details in {error}"
    assert status.code == error.code().value[0] and status.message == error.details()
    out = Details(status.code)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.fields.extend(v.field for v in bad.field_violations)
    assert out.domain == "tokenflow.v1"
    return out


def error_of(call: Callable[[], Any]) -> grpc.RpcError:
    """Run a call (draining a stream) and return the RpcError it must end with."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return info.value


@pytest.fixture(scope="module")
def host() -> ModelHost:
    h = ModelHost("tiny", device="cpu")
    h.get()
    return h


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=8, size=(64, 64), fps=8
    ).read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, host: ModelHost) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("server"), host)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    c = Client(server)
    yield c
    assert c.status() == SERVING  # nothing in this module took the server down
    c.close()


@pytest.fixture(scope="module")
def inverted(client: Client, clip: bytes) -> tuple[str, str]:
    video = client.upload(clip)
    events = list(client.invert(video, timeout=60))
    return video, events[-1].result.digest


@pytest.fixture
def held_model(host: ModelHost) -> Iterator[Callable[[], None]]:
    """Hold the model lock so jobs wait (running, cancellable) until the returned function is called."""
    host.lock.acquire()
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            host.lock.release()

    yield release
    release()


def background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Drain a stream on a thread; the list gets the events and then the RpcError, if any."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.extend(call())
        except grpc.RpcError as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# ----------------------------------------------------------------------------------------------------------
# INVALID_ARGUMENT and NOT_FOUND


def test_malformed_digests_are_invalid_arguments(client: Client) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.invert("not-a-digest"),
        lambda: client.invert("AB" * 32),
        lambda: client.keyframes.EditKeyframes(
            keyframes_pb2.EditKeyframesRequest(
                inversion_digest="abc", edit=common_pb2.EditSpec(prompt="a cat")
            )
        ),
        lambda: client.propagation.Propagate(
            propagation_pb2.PropagateRequest(inversion_digest="", edit=common_pb2.EditSpec(prompt="a cat"))
        ),
        lambda: client.propagation.Cancel(propagation_pb2.PropagationCancelRequest(job_id="123")),
    ]
    fields = []
    for call in calls:
        error = error_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "64 lowercase hex" in error.details()
        d = details_of(error)
        assert d.reason == "INVALID_SPEC" and d.retry_delay is None
        fields.extend(d.fields)
        assert client.status() == SERVING
    assert fields == ["video_digest", "video_digest", "inversion_digest", "inversion_digest", "job_id"]


def test_unknown_digests_are_not_found_with_what_to_do(client: Client) -> None:
    error = error_of(lambda: client.invert(UNKNOWN))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "Artifacts.Upload" in error.details()
    assert details_of(error).reason == "ARTIFACT_NOT_FOUND"
    for call in (
        lambda: client.keyframes.EditKeyframes(
            keyframes_pb2.EditKeyframesRequest(
                inversion_digest=UNKNOWN, edit=common_pb2.EditSpec(prompt="a cat")
            )
        ),
        lambda: client.propagation.Propagate(
            propagation_pb2.PropagateRequest(
                inversion_digest=UNKNOWN, edit=common_pb2.EditSpec(prompt="a cat")
            )
        ),
    ):
        error = error_of(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "Inversion.Invert" in error.details()
        assert details_of(error).reason == "ARTIFACT_NOT_FOUND"
    assert client.status() == SERVING


def test_a_digest_of_the_wrong_kind_is_an_invalid_argument(client: Client, inverted: tuple[str, str]) -> None:
    video, inversion = inverted
    error = error_of(
        lambda: client.propagation.Propagate(
            propagation_pb2.PropagateRequest(inversion_digest=video, edit=common_pb2.EditSpec(prompt="a cat"))
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'video'" in error.details()
    assert details_of(error).reason == "WRONG_ARTIFACT_KIND"
    error = error_of(lambda: client.invert(inversion))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(error).reason == "WRONG_ARTIFACT_KIND"


def test_bytes_that_are_not_a_video_are_rejected_and_nothing_is_stored(
    server: RunningServer, client: Client, host: ModelHost
) -> None:
    video = client.upload(os.urandom(5000), filename="noise.mp4")
    error = error_of(lambda: client.invert(video))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "video" in error.details()
    assert details_of(error).reason == "INVALID_VIDEO"
    key = inversion_key(
        video, DecodeSpec.sized((64, 64)), InversionSpec(steps=4, edit_steps=2), host.fingerprint
    )
    assert not server.store.contains(key)
    assert not list(server.store.tmp_dir.iterdir())  # no scratch files left behind
    assert client.status() == SERVING


BAD_INVERSIONS = {
    "steps not a multiple of edit steps": common_pb2.InversionSpec(steps=5, edit_steps=2),
    "steps off the model's schedule": common_pb2.InversionSpec(steps=6, edit_steps=2),
    "zero steps": common_pb2.InversionSpec(steps=0),
    "batch too large": common_pb2.InversionSpec(batch_size=1000),
}


@pytest.mark.parametrize("spec", BAD_INVERSIONS.values(), ids=BAD_INVERSIONS.keys())
def test_bad_inversion_specs_are_invalid_arguments(
    client: Client, inverted: tuple[str, str], spec: common_pb2.InversionSpec
) -> None:
    video, _ = inverted
    error = error_of(lambda: client.invert(video, spec))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inversion." in error.details()
    d = details_of(error)
    assert d.reason == "INVALID_SPEC" and d.fields and all(f.startswith("inversion.") for f in d.fields)
    assert client.status() == SERVING


def test_bad_decode_specs_are_invalid_arguments(client: Client, inverted: tuple[str, str]) -> None:
    video, _ = inverted
    for decode in (
        common_pb2.DecodeSpec(width=64),
        common_pb2.DecodeSpec(width=60, height=64),
        common_pb2.DecodeSpec(stride=0),
    ):
        request = inversion_pb2.InvertRequest(video_digest=video, decode=decode, inversion=INVERSION)
        error = error_of(lambda r=request: client.inversion.Invert(r))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decode." in error.details()
        d = details_of(error)
        assert d.reason == "INVALID_SPEC" and d.fields and d.fields[0].startswith("decode.")


BAD_EDITS = {
    "empty prompt": common_pb2.EditSpec(prompt="  "),
    "guidance out of range": common_pb2.EditSpec(prompt="a cat", guidance_scale=60),
    "guidance not a number": common_pb2.EditSpec(prompt="a cat", guidance_scale=float("nan")),
    "pnp fraction above one": common_pb2.EditSpec(prompt="a cat", pnp_attn_t=1.5),
    "unknown method": common_pb2.EditSpec(prompt="a cat", method=99),
    "seed too large": common_pb2.EditSpec(prompt="a cat", seed=2**64 - 1),
    "schedule with the wrong number of rows": common_pb2.EditSpec(
        prompt="a cat", keyframe_interval=4, keyframe_schedule=[common_pb2.KeyframeRow(frames=[1, 5])]
    ),
    "schedule outside the windows": common_pb2.EditSpec(
        prompt="a cat",
        keyframe_interval=4,
        keyframe_schedule=[common_pb2.KeyframeRow(frames=[5, 1]), common_pb2.KeyframeRow(frames=[0, 4])],
    ),
}


@pytest.mark.parametrize("spec", BAD_EDITS.values(), ids=BAD_EDITS.keys())
def test_bad_edit_specs_are_invalid_arguments(
    server: RunningServer, client: Client, inverted: tuple[str, str], spec: common_pb2.EditSpec
) -> None:
    _, inversion = inverted
    queued = server.metrics.registry.get_sample_value(
        "tokenflow_jobs_total", {"stage": "propagation", "outcome": "invalid_argument"}
    )
    error = error_of(
        lambda: client.propagation.Propagate(
            propagation_pb2.PropagateRequest(inversion_digest=inversion, edit=spec)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "edit." in error.details() or "schedule" in error.details()
    d = details_of(error)
    assert d.reason == "INVALID_SPEC" and d.retry_delay is None
    assert len(d.fields) == 1 and d.fields[0].startswith("edit."), d.fields
    assert d.metadata["field"] == d.fields[0]
    # Refused before a job was queued.
    assert (
        server.metrics.registry.get_sample_value(
            "tokenflow_jobs_total", {"stage": "propagation", "outcome": "invalid_argument"}
        )
        == queued
    )
    assert client.status() == SERVING


def test_a_keyframe_preview_of_a_method_without_keyframes_is_an_invalid_argument(
    client: Client, inverted: tuple[str, str]
) -> None:
    _, inversion = inverted
    spec = common_pb2.EditSpec(prompt="a cat", method=common_pb2.EDIT_METHOD_PER_FRAME)
    error = error_of(
        lambda: client.keyframes.EditKeyframes(
            keyframes_pb2.EditKeyframesRequest(inversion_digest=inversion, edit=spec)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Propagation" in error.details()
    assert details_of(error).fields == ["edit.method"]


# ----------------------------------------------------------------------------------------------------------
# RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAVAILABLE


def test_a_full_queue_is_resource_exhausted(
    tmp_path: Path, host: ModelHost, clip: bytes, held_model: Callable[[], None]
) -> None:
    running = start(tmp_path, host, max_queue=0)
    c = Client(running)
    try:
        video = c.upload(clip)
        thread, out = background(lambda: c.invert(video, timeout=60))
        jobs = running.stages["inversion"].jobs
        wait_for(lambda: jobs.running == 1, what="the first job to run")
        error = error_of(lambda: c.invert(video, common_pb2.InversionSpec(steps=10, edit_steps=2)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in error.details() and "retry" in error.details()
        d = details_of(error)  # a retry can succeed: unlike INPUT_TOO_LARGE, it says when
        assert d.reason == "QUEUE_FULL" and d.retry_delay is not None and d.retry_delay > 0
        assert c.status() == SERVING
        # The same request as the running job is not a new job: it attaches instead of being refused.
        thread2, out2 = background(lambda: c.invert(video, timeout=60))
        wait_for(lambda: jobs.jobs()[0].attached == 2, what="the second caller to attach")
        held_model()
        thread.join(30)
        thread2.join(30)
        assert out[-1].result.digest == out2[-1].result.digest
    finally:
        c.close()
        running.stop(grace=0)


def test_a_missing_model_is_a_failed_precondition(tmp_path: Path, clip: bytes) -> None:
    running = start(tmp_path, None, model=str(tmp_path / "no-such-model"))
    c = Client(running)
    try:
        video = c.upload(clip)
        error = error_of(lambda: c.invert(video))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no-such-model" in error.details() and "--model" in error.details()
        d = details_of(error)
        assert d.reason == "MODEL_UNAVAILABLE" and d.retry_delay is None
        assert c.status() == SERVING
        assert c.status("tokenflow.v1.Inversion") == SERVING
    finally:
        c.close()
        running.stop(grace=0)


def test_shutdown_refuses_new_jobs_with_unavailable_and_lets_running_ones_finish(
    tmp_path: Path, host: ModelHost, clip: bytes, held_model: Callable[[], None]
) -> None:
    running = start(tmp_path, host)
    c = Client(running)
    try:
        video = c.upload(clip)
        thread, out = background(lambda: c.invert(video, timeout=60))
        jobs = running.stages["inversion"].jobs
        wait_for(lambda: jobs.running == 1, what="the job to run")
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 30}, daemon=True)
        stopper.start()
        wait_for(lambda: c.status() == NOT_SERVING, what="health to turn NOT_SERVING")
        error = error_of(lambda: c.invert(video, common_pb2.InversionSpec(steps=10, edit_steps=2)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.details() and "another replica" in error.details()
        d = details_of(error)
        assert d.reason == "SHUTTING_DOWN" and d.retry_delay is not None
        held_model()  # the running job finishes within the grace period
        thread.join(30)
        assert out and out[-1].WhichOneof("event") == "result", out[-1:]
        stopper.join(30)
        assert not stopper.is_alive()
    finally:
        c.close()
        running.stop(grace=0)


def test_shutdown_cancels_jobs_that_outlive_the_grace_with_unavailable(
    tmp_path: Path, host: ModelHost, clip: bytes, held_model: Callable[[], None]
) -> None:
    running = start(tmp_path, host)
    c = Client(running)
    try:
        video = c.upload(clip)
        thread, out = background(lambda: c.invert(video, timeout=60))
        jobs = running.stages["inversion"].jobs
        wait_for(lambda: jobs.running == 1, what="the job to run")
        started = time.monotonic()
        running.stop(grace=0.2)
        assert time.monotonic() - started < 15
        thread.join(10)
        assert isinstance(out[-1], grpc.RpcError)
        assert out[-1].code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in out[-1].details()
        assert details_of(out[-1]).reason == "SHUTTING_DOWN"
    finally:
        c.close()
        running.stop(grace=0)


# ----------------------------------------------------------------------------------------------------------
# the error table and the Editor's relaying


def test_every_error_class_is_declared_once() -> None:
    import tokenflow.errors as library
    from services.errors import ERRORS, error_class

    reasons = [e.reason for e in ERRORS]
    assert len(set(reasons)) == len(reasons)
    assert len({e.exception for e in ERRORS}) == len(ERRORS)
    classes = [
        c
        for c in vars(library).values()
        if isinstance(c, type) and issubclass(c, library.TokenFlowError) and c is not library.TokenFlowError
    ]
    assert classes
    for cls in classes:
        entry = error_class(cls("x"))
        assert entry is not None, f"{cls.__name__} has no status"
    # Distinguishable without reading text: same code, different reason and retry advice.
    full, large = (next(e for e in ERRORS if e.reason == r) for r in ("QUEUE_FULL", "INPUT_TOO_LARGE"))
    assert full.code == large.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.retry_after is not None and large.retry_after is None


def test_addresses_are_scrubbed_from_relayed_messages() -> None:
    from services.errors import scrub_addresses

    grpc_text = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50799: Connection refused"
    )
    out = scrub_addresses(grpc_text, "the inversion stage")
    assert "127.0.0.1" not in out and "50799" not in out and "ipv4" not in out
    assert "the inversion stage" in out
    for address in ("ipv6:[::1]:50051", "[::1]:50051", "localhost:50051", "stage-1.tokenflow.svc:443"):
        assert scrub_addresses(f"x {address} y", "S") == "x S y", address
    plain = "edits[2]: edit.seed must be in [0, 2^63), at 12:30 use 1.5"
    assert scrub_addresses(plain, "S") == plain


def test_the_editor_relays_a_stages_status_with_its_details(tmp_path: Path, host: ModelHost) -> None:
    from clients import ClientError, TokenFlowClient, decode_spec

    running = start(tmp_path, host, services=frozenset({*STAGES, "editor"}))
    try:
        with TokenFlowClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            with pytest.raises(ClientError) as info:  # the inversion stage answers NOT_FOUND
                client.edit(UNKNOWN, "a cat", decode=decode_spec(size=(64, 64)))
            assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason == "ARTIFACT_NOT_FOUND"
            assert "Artifacts.Upload" in info.value.message
            assert "127.0.0.1" not in info.value.message
            with pytest.raises(ClientError) as info:  # the Editor's own check, with the edit's index
                client.edit(UNKNOWN, ["a cat", "a dog", ""], decode=decode_spec(size=(64, 64)))
            assert info.value.reason == "INVALID_SPEC"
            assert info.value.field_violations[0][0] == "edits[2].prompt"
            assert not info.value.retryable
    finally:
        running.stop(grace=0)
