"""The stage services end to end: real gRPC server on loopback, real stubs, the tiny model, tiny clips.

Long jobs are made by holding the shared model lock from the test: a job then waits "for the model"
(running, cancellable) until the test lets go, which makes dedupe, cancel and re-attach deterministic.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from loopback import stage_server as start

from clients import ClientError
from services.model_host import ModelHost
from services.server import RunningServer
from tokenflow.synthetic import make_clip
from tokenflow.video import count_frames, probe
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

FRAMES = 8
DECODE = common_pb2.DecodeSpec(width=64, height=64)
INVERSION = common_pb2.InversionSpec(steps=4, edit_steps=2)


def edit(prompt: str = "a marble statue", seed: int = 0) -> common_pb2.EditSpec:
    return common_pb2.EditSpec(prompt=prompt, seed=seed, keyframe_interval=4)


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Client:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.artifacts = artifacts_pb2_grpc.ArtifactsStub(self.channel)
        self.inversion = inversion_pb2_grpc.InversionStub(self.channel)
        self.keyframes = keyframes_pb2_grpc.KeyframesStub(self.channel)
        self.propagation = propagation_pb2_grpc.PropagationStub(self.channel)

    def upload(self, data: bytes, filename: str = "clip.mp4") -> str:
        def requests() -> Iterator[artifacts_pb2.UploadRequest]:
            yield artifacts_pb2.UploadRequest(
                header=artifacts_pb2.UploadHeader(
                    kind=common_pb2.ARTIFACT_KIND_VIDEO, filename=filename, total_size=len(data)
                )
            )
            for i in range(0, len(data), 1 << 20):
                yield artifacts_pb2.UploadRequest(chunk=data[i : i + (1 << 20)])

        return self.artifacts.Upload(requests(), timeout=30).digest

    def download(self, digest: str, name: str = "") -> bytes:
        messages = list(self.artifacts.Download(artifacts_pb2.DownloadRequest(digest=digest, name=name)))
        header = messages[0].header
        data = b"".join(m.chunk for m in messages[1:])
        assert hashlib.sha256(data).hexdigest() == header.sha256
        return data

    def invert(
        self, video: str, inversion: common_pb2.InversionSpec = INVERSION
    ) -> list[inversion_pb2.InvertResponse]:
        request = inversion_pb2.InvertRequest(video_digest=video, decode=DECODE, inversion=inversion)
        return list(self.inversion.Invert(request, timeout=120))

    def propagate(self, inversion: str, spec: common_pb2.EditSpec) -> list[propagation_pb2.PropagateResponse]:
        request = propagation_pb2.PropagateRequest(inversion_digest=inversion, edit=spec)
        return list(self.propagation.Propagate(request, timeout=120))

    def close(self) -> None:
        self.channel.close()


def result_of(events: Sequence[Any]) -> common_pb2.Result:
    assert events and events[-1].WhichOneof("event") == "result", events
    assert all(e.WhichOneof("event") == "progress" for e in events[:-1])
    return events[-1].result


def sample(server: RunningServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


class Streamer:
    """Consumes a server stream on a thread, keeping every event and the final error."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.events: list[Any] = []
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()
        self._call = call
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self._call():
                self.events.append(event)
                self.first.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first.set()

    def job_id(self) -> str:
        assert self.first.wait(20)
        return self.events[0].progress.job_id

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def host() -> ModelHost:
    h = ModelHost("tiny", device="cpu")
    h.get()
    return h


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=(64, 64), fps=8)
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, host: ModelHost) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("server"), host)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    c = Client(server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def inverted(client: Client, clip: bytes) -> tuple[str, common_pb2.Result]:
    video = client.upload(clip)
    return video, result_of(client.invert(video))


@pytest.fixture
def held_model(host: ModelHost) -> Iterator[threading.Lock]:
    """Hold the model lock: jobs start but wait for the model until the test releases it."""
    host.lock.acquire()
    released = threading.Event()

    class Handle:
        def release(self) -> None:
            if not released.is_set():
                released.set()
                host.lock.release()

    handle = Handle()
    yield handle  # type: ignore[misc]
    handle.release()


# ----------------------------------------------------------------------------------------------------------


def test_invert_streams_progress_then_a_result_and_caches_it(
    server: RunningServer, client: Client, clip: bytes
) -> None:
    video = client.upload(clip)
    inversions = sample(server, "tokenflow_inversions_total")
    events = client.invert(video, common_pb2.InversionSpec(steps=4, edit_steps=2, batch_size=4))
    result = result_of(events)
    phases = [e.progress.phase for e in events[:-1]]
    assert {common_pb2.PHASE_INVERT, common_pb2.PHASE_RECONSTRUCT} <= set(phases)
    assert all(e.progress.stage == common_pb2.STAGE_INVERSION for e in events[:-1])
    invert = [e.progress for e in events[:-1] if e.progress.phase == common_pb2.PHASE_INVERT]
    # One report per completed step; a slow step (a loaded machine) also reports from inside it, with
    # the frames done so far and the step still in progress.
    steps = [p for p in invert if p.frames_done == p.frames_total]
    within = [p for p in invert if p.frames_done < p.frames_total]
    assert [p.step for p in steps] == [1, 2, 3, 4] and all(p.total_steps == 4 for p in invert)
    assert all(0 <= p.step < 4 and p.frames_total == FRAMES for p in within)
    assert all(p.HasField("elapsed") for p in steps)
    elapsed = [p.elapsed.ToNanoseconds() for p in steps]
    assert elapsed == sorted(elapsed)
    assert all(e.progress.job_id == result.digest for e in events[:-1])
    assert result.kind == common_pb2.ARTIFACT_KIND_INVERSION
    assert not result.cache_hit and len(result.digest) == 64
    info = result.inversion
    assert (info.frames, info.fps, info.width, info.height) == (FRAMES, 8.0, 64, 64)
    assert (info.steps, info.edit_steps, info.video_digest) == (4, 2, video)
    assert info.HasField("reconstruction_psnr_db")
    assert result.test_model and result.model == "tiny"
    assert any("test model" in w for w in result.warnings)
    assert {f.name for f in result.files} == {
        "inversion.json",
        "latents_clean.safetensors",
        "noisiest.safetensors",
        "source_000.safetensors",
        "source_001.safetensors",
    }  # one tensor file per editing step
    assert sample(server, "tokenflow_inversions_total") == inversions + 1

    again = client.invert(video, common_pb2.InversionSpec(steps=4, edit_steps=2, batch_size=4))
    cached = result_of(again)
    assert cached.cache_hit and cached.digest == result.digest
    assert cached.inversion == result.inversion
    assert sample(server, "tokenflow_inversions_total") == inversions + 1
    stat = client.artifacts.Get(artifacts_pb2.GetRequest(digest=result.digest)).artifact
    assert stat.kind == common_pb2.ARTIFACT_KIND_INVERSION


def test_edit_keyframes_returns_png_images(client: Client, inverted: tuple[str, common_pb2.Result]) -> None:
    _, inversion = inverted
    request = keyframes_pb2.EditKeyframesRequest(inversion_digest=inversion.digest, edit=edit())
    result = result_of(list(client.keyframes.EditKeyframes(request, timeout=60)))
    info = result.keyframes
    assert result.kind == common_pb2.ARTIFACT_KIND_KEYFRAMES and not result.cache_hit
    assert list(info.keyframe_indices) == [2, 6]  # one per window of 4 frames, its middle frame
    assert (info.width, info.height) == (64, 64)
    for name in info.image_files:
        image = cv2.imdecode(np.frombuffer(client.download(result.digest, name), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (64, 64, 3)
    again = result_of(list(client.keyframes.EditKeyframes(request, timeout=60)))
    assert again.cache_hit and again.digest == result.digest


def test_propagate_returns_the_edited_video_with_the_sources_frames_and_audio(
    client: Client, inverted: tuple[str, common_pb2.Result], tmp_path: Path
) -> None:
    _, inversion = inverted
    result = result_of(client.propagate(inversion.digest, edit()))
    info = result.propagation
    assert result.kind == common_pb2.ARTIFACT_KIND_PROPAGATION and info.video_file == "edited.mp4"
    assert (info.frames, info.fps, info.width, info.height) == (FRAMES, 8.0, 64, 64)
    data = client.download(result.digest)  # the primary file
    assert hashlib.sha256(data).hexdigest() == info.video_sha256
    path = tmp_path / "edited.mp4"
    path.write_bytes(data)
    assert count_frames(path) == FRAMES
    assert probe(path).has_audio
    again = result_of(client.propagate(inversion.digest, edit()))
    assert again.cache_hit and again.digest == result.digest


def test_identical_requests_in_flight_share_one_computation(
    server: RunningServer, client: Client, inverted: tuple[str, common_pb2.Result], held_model: Any
) -> None:
    _, inversion = inverted
    computed = sample(server, "tokenflow_jobs_total", stage="propagation", outcome="ok")
    spec = edit(seed=7)
    callers = [
        Streamer(
            lambda: client.propagation.Propagate(
                propagation_pb2.PropagateRequest(inversion_digest=inversion.digest, edit=spec), timeout=60
            )
        )
        for _ in range(2)
    ]
    job_ids = {c.job_id() for c in callers}
    assert len(job_ids) == 1
    job = server.stages["propagation"].jobs.get(job_ids.pop())
    assert job is not None
    wait_for(lambda: job.attached == 2, what="both callers attached")
    held_model.release()
    for c in callers:
        c.join()
        assert c.error is None
    digests = {result_of(c.events).digest for c in callers}
    assert len(digests) == 1
    assert sample(server, "tokenflow_jobs_total", stage="propagation", outcome="ok") == computed + 1


def test_a_corrupt_inversion_is_rebuilt_not_served(
    server: RunningServer, client: Client, inverted: tuple[str, common_pb2.Result]
) -> None:
    _, inversion = inverted
    stored = server.store.get(inversion.digest)
    assert stored is not None
    path = stored.path("source_001.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the digest check can tell
    path.write_bytes(bytes(data))
    inversions = sample(server, "tokenflow_inversions_total")
    corrupt = sample(server, "tokenflow_cache_corrupt_total", kind="inversion")

    result = result_of(client.propagate(inversion.digest, edit(seed=11)))
    assert result.propagation.frames == FRAMES
    assert sample(server, "tokenflow_cache_corrupt_total", kind="inversion") == corrupt + 1
    assert sample(server, "tokenflow_inversions_total") == inversions + 1
    rebuilt = server.store.get(inversion.digest, verify=True)
    assert rebuilt is not None  # published again under the same content address
    assert rebuilt.manifest.files["source_001.safetensors"].sha256 == next(
        f.sha256 for f in inversion.files if f.name == "source_001.safetensors"
    )


def test_cancel_stops_a_running_job(
    server: RunningServer, client: Client, inverted: tuple[str, common_pb2.Result], held_model: Any
) -> None:
    video, _ = inverted
    request = inversion_pb2.InvertRequest(
        video_digest=video, decode=DECODE, inversion=common_pb2.InversionSpec(steps=10, edit_steps=2)
    )
    caller = Streamer(lambda: client.inversion.Invert(request, timeout=60))
    job_id = caller.job_id()
    jobs = server.stages["inversion"].jobs
    wait_for(lambda: jobs.running == 1, what="the job to run")
    response = client.inversion.Cancel(inversion_pb2.InversionCancelRequest(job_id=job_id))
    assert response.cancelled
    caller.join()
    assert caller.error is not None and caller.error.code() == grpc.StatusCode.CANCELLED
    assert "cancel" in caller.error.details()
    assert ClientError.from_rpc_error(caller.error).reason == "CANCELLED"
    wait_for(lambda: jobs.running == 0, what="the worker to be free")
    assert jobs.get(job_id) is None
    assert not client.inversion.Cancel(inversion_pb2.InversionCancelRequest(job_id=job_id)).cancelled
    assert not server.store.contains(job_id)


def test_delete_refuses_an_artifact_a_running_job_holds(
    server: RunningServer, client: Client, tmp_path: Path, held_model: Any
) -> None:
    # A video of its own (other tests share the module's clip): deleting it must not affect them.
    own = make_clip(tmp_path / "own.mp4", frames=4, size=(64, 64), fps=8).read_bytes()
    video = client.upload(own, filename="own.mp4")
    light = common_pb2.InversionSpec(steps=4, edit_steps=2, reconstruct=False)
    request = inversion_pb2.InvertRequest(video_digest=video, decode=DECODE, inversion=light)
    caller = Streamer(lambda: client.inversion.Invert(request, timeout=120))
    caller.job_id()
    jobs = server.stages["inversion"].jobs
    wait_for(lambda: jobs.running == 1, what="the job to run")  # it pins its video, then waits for the model
    wait_for(lambda: server.store.is_pinned(video), what="the job to pin its video")
    with pytest.raises(grpc.RpcError) as refused:
        client.artifacts.Delete(artifacts_pb2.DeleteRequest(digest=video), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ClientError.from_rpc_error(refused.value).reason == "ARTIFACT_IN_USE"
    held_model.release()
    caller.join()
    assert caller.error is None and result_of(caller.events).inversion.frames == 4
    client.artifacts.Delete(artifacts_pb2.DeleteRequest(digest=video), timeout=10)  # no job holds it now
    assert not server.store.contains(video)


def test_a_caller_who_disconnects_and_asks_again_reattaches_to_the_same_job(
    server: RunningServer, client: Client, inverted: tuple[str, common_pb2.Result], held_model: Any
) -> None:
    video, _ = inverted
    request = inversion_pb2.InvertRequest(
        video_digest=video, decode=DECODE, inversion=common_pb2.InversionSpec(steps=8, edit_steps=2)
    )
    computed = sample(server, "tokenflow_jobs_total", stage="inversion", outcome="ok")
    inversions = sample(server, "tokenflow_inversions_total")
    first: list[inversion_pb2.InvertResponse] = []
    with pytest.raises(grpc.RpcError) as gone:
        for event in client.inversion.Invert(request, timeout=1.0):
            first.append(event)
    assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    job_id = first[0].progress.job_id
    jobs = server.stages["inversion"].jobs
    job = jobs.get(job_id)
    assert job is not None and not job.done  # the job outlives its caller (grace period)
    wait_for(lambda: job.attached == 0, what="the first caller to detach")

    again = Streamer(lambda: client.inversion.Invert(request, timeout=60))
    assert again.job_id() == job_id
    assert jobs.get(job_id) is job
    held_model.release()
    again.join()
    assert result_of(again.events).digest == job_id
    assert sample(server, "tokenflow_jobs_total", stage="inversion", outcome="ok") == computed + 1
    assert sample(server, "tokenflow_inversions_total") == inversions + 1


def test_a_job_nobody_waits_for_is_cancelled_after_the_grace_period(
    tmp_path: Path, host: ModelHost, clip: bytes, held_model: Any
) -> None:
    running = start(tmp_path, host, job_grace_seconds=0.3)
    c = Client(running)
    try:
        video = c.upload(clip)
        with pytest.raises(grpc.RpcError) as gone:
            list(
                c.inversion.Invert(
                    inversion_pb2.InvertRequest(video_digest=video, decode=DECODE), timeout=0.5
                )
            )
        assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        jobs = running.stages["inversion"].jobs
        wait_for(lambda: not jobs.jobs() and jobs.running == 0, timeout=10, what="the abandoned job to stop")
        assert sample(running, "tokenflow_jobs_total", stage="inversion", outcome="cancelled") == 1
        assert (
            sample(
                running,
                "tokenflow_requests_total",
                service="inversion",
                method="Invert",
                outcome="deadline_exceeded",
            )
            == 1
        )
    finally:
        c.close()
        running.stop(grace=0)
