"""The services end to end over real gRPC on loopback ports.

First the Editor against scripted stage servers (its orchestration: dedupe, deadline and cancellation
propagation, error pass-through), then the real thing on the tiny model: one process with every service,
and the stages as separate OS processes sharing one cache directory.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from loopback import metric, scrape, tiny_server_config
from serve_process import ServeProcess

from clients import ClientError, TokenFlowClient, decode_spec, edit_spec, inversion_spec
from services.editor import EditorServicer, add_to_server, canonical_edit
from services.errors import ErrorInterceptor
from services.metrics import Metrics
from tokenflow_pb.v1 import (
    common_pb2,
    editor_pb2,
    inversion_pb2,
    inversion_pb2_grpc,
    keyframes_pb2,
    keyframes_pb2_grpc,
    propagation_pb2,
    propagation_pb2_grpc,
)

VIDEO = "ab" * 32


# ----------------------------------------------------------------------------------------------------------
# The Editor against scripted stages


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


RESPONSES: dict[str, Any] = {
    "inversion": inversion_pb2.InvertResponse,
    "keyframes": keyframes_pb2.EditKeyframesResponse,
    "propagation": propagation_pb2.PropagateResponse,
}
STAGE = {
    "inversion": common_pb2.STAGE_INVERSION,
    "keyframes": common_pb2.STAGE_KEYFRAMES,
    "propagation": common_pb2.STAGE_PROPAGATION,
}
KIND = {
    "inversion": common_pb2.ARTIFACT_KIND_INVERSION,
    "keyframes": common_pb2.ARTIFACT_KIND_KEYFRAMES,
    "propagation": common_pb2.ARTIFACT_KIND_PROPAGATION,
}


def _progress(stage: str, step: int, total: int) -> Any:
    return RESPONSES[stage](
        progress=common_pb2.Progress(
            stage=STAGE[stage], phase=common_pb2.PHASE_EDIT, step=step, total_steps=total
        )
    )


class FakeStages(
    inversion_pb2_grpc.InversionServicer,
    keyframes_pb2_grpc.KeyframesServicer,
    propagation_pb2_grpc.PropagationServicer,
):
    """Stage servers that answer instantly, fail on demand, or block until their caller leaves."""

    def __init__(self) -> None:
        self.invert_calls: list[Any] = []
        self.edit_calls: list[Any] = []
        self.remaining: list[float | None] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.block = False
        self.ended = threading.Event()

    def Invert(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        self.invert_calls.append(request)
        yield _progress("inversion", 1, 2)
        yield _progress("inversion", 2, 2)
        digest = _digest("inversion", request.video_digest)
        yield inversion_pb2.InvertResponse(
            result=common_pb2.Result(
                job_id=digest,
                digest=digest,
                kind=KIND["inversion"],
                inversion=common_pb2.InversionInfo(frames=4),
            )
        )

    def _edit(self, request: Any, context: grpc.ServicerContext, kind: str) -> Iterator[Any]:
        self.edit_calls.append(request)
        self.remaining.append(context.time_remaining())
        context.add_callback(self.ended.set)  # fires when the call ends, however it ends
        if self.fail is not None:
            context.abort(*self.fail)
        yield _progress(kind, 1, 1)
        if self.block:
            while context.is_active():
                time.sleep(0.01)
            return
        digest = _digest(
            kind, request.inversion_digest, request.edit.SerializeToString(deterministic=True).hex()
        )
        result = common_pb2.Result(job_id=digest, digest=digest, kind=KIND[kind])
        if kind == "propagation":
            result.propagation.video_file = "video.mp4"
        else:
            result.keyframes.image_files.append("keyframe_0000.png")
        yield RESPONSES[kind](result=result)

    def Propagate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        yield from self._edit(request, context, "propagation")

    def EditKeyframes(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        yield from self._edit(request, context, "keyframes")


class ScriptedServer:
    """An Editor plus scripted stages on one loopback server; the Editor reaches them through gRPC."""

    def __init__(self) -> None:
        self.stages = FakeStages()
        self.metrics = Metrics()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), interceptors=[ErrorInterceptor(self.metrics)]
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        inversion_pb2_grpc.add_InversionServicer_to_server(self.stages, self.server)
        keyframes_pb2_grpc.add_KeyframesServicer_to_server(self.stages, self.server)
        propagation_pb2_grpc.add_PropagationServicer_to_server(self.stages, self.server)
        self.editor = EditorServicer(target, target, target, artifacts_store=None, metrics=self.metrics)  # type: ignore[arg-type]
        add_to_server(self.server, self.editor)
        self.server.start()
        self.client = TokenFlowClient(target)

    def requests(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tokenflow_requests_total", {"service": "editor", "method": "Edit", "outcome": outcome}
        )
        return value or 0.0

    def close(self) -> None:
        self.client.close()
        self.server.stop(grace=None)
        self.editor.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


def test_canonical_edit_fills_defaults() -> None:
    assert canonical_edit(edit_spec("a cat")) == canonical_edit(edit_spec("a cat", guidance=7.5, seed=0))
    assert canonical_edit(edit_spec("a cat")) == canonical_edit(edit_spec("a cat", method="tokenflow"))
    assert canonical_edit(edit_spec("a cat")) != canonical_edit(edit_spec("a cat", guidance=5))
    assert canonical_edit(edit_spec("a cat")) != canonical_edit(edit_spec("a cat", negative_prompt=""))
    assert canonical_edit(edit_spec("a cat")) != canonical_edit(edit_spec("a dog"))


def test_editor_inverts_once_and_dedupes_identical_edits(scripted: ScriptedServer) -> None:
    events: list[Any] = []
    edits = [edit_spec("a cat"), edit_spec("a dog"), edit_spec("a cat", guidance=7.5)]
    results = scripted.client.edit(VIDEO, edits, on_event=events.append)

    assert len(scripted.stages.invert_calls) == 1
    assert [c.edit.prompt for c in scripted.stages.edit_calls] == ["a cat", "a dog"]
    assert [r.kind for r in results] == [common_pb2.ARTIFACT_KIND_PROPAGATION] * 3
    assert results[0].digest == results[2].digest != results[1].digest
    assert results[2].cache_hit and not results[0].cache_hit
    # The inversion's events come first, tagged -1; then each edit's, in order; one Result per index.
    # A duplicate's Result follows its original's at once.
    assert [e.edit_index for e in events] == [-1, -1, -1, 0, 0, 2, 1, 1]
    result_indices = [e.edit_index for e in events if e.WhichOneof("event") == "result"]
    assert sorted(result_indices) == [-1, 0, 1, 2]
    # Every edit was made from the inversion's result.
    assert {c.inversion_digest for c in scripted.stages.edit_calls} == {_digest("inversion", VIDEO)}
    assert scripted.requests("ok") == 1


def test_editor_keyframes_only_calls_the_keyframes_stage(scripted: ScriptedServer) -> None:
    (result,) = scripted.client.edit(VIDEO, "a cat", keyframes_only=True)
    assert result.kind == common_pb2.ARTIFACT_KIND_KEYFRAMES
    assert list(result.keyframes.image_files) == ["keyframe_0000.png"]


def test_editor_passes_downstream_errors_through(scripted: ScriptedServer) -> None:
    scripted.stages.fail = (grpc.StatusCode.NOT_FOUND, "no inversion 1234: run Inversion.Invert first")
    with pytest.raises(ClientError) as info:
        scripted.client.edit(VIDEO, ["a cat", "a dog"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "no inversion 1234: run Inversion.Invert first"
    assert str(info.value) == "NOT_FOUND: no inversion 1234: run Inversion.Invert first"
    assert len(scripted.stages.edit_calls) == 1  # the first failure ends the stream
    assert scripted.requests("not_found") == 1


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"video_digest": ""}, "video_digest is required"),
        ({"video_digest": "not-a-digest"}, "malformed video_digest"),
        ({"edits": []}, "at least one edit"),
        ({"edits": [edit_spec("a cat"), edit_spec(" ")]}, "edits[1]: edit.prompt must not be empty"),
        ({"decode": decode_spec(size=(60, 64))}, "decode.size"),
        ({"inversion": inversion_spec(steps=5, edit_steps=2)}, "multiple of the editing steps"),
    ],
)
def test_editor_rejects_bad_requests_before_inverting(
    scripted: ScriptedServer, fields: dict[str, Any], needle: str
) -> None:
    from tokenflow_pb.v1 import editor_pb2_grpc

    stub = editor_pb2_grpc.EditorStub(scripted.client.channel)
    request = editor_pb2.EditRequest(**{"video_digest": VIDEO, "edits": [edit_spec("a cat")], **fields})
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Edit(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    assert scripted.stages.invert_calls == []


def test_editor_hands_the_callers_deadline_to_the_stages(scripted: ScriptedServer) -> None:
    scripted.stages.block = True
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        scripted.client.edit(VIDEO, "a cat", timeout=1.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    (remaining,) = scripted.stages.remaining
    assert remaining is not None and 0 < remaining <= 1.5
    assert scripted.stages.ended.wait(5), "the stage call outlived the caller's deadline"


def test_editor_cancels_the_stage_call_when_the_caller_leaves(scripted: ScriptedServer) -> None:
    scripted.stages.block = True

    class Stop(Exception):
        pass

    def on_event(event: Any) -> None:
        if event.edit_index == 0:  # the propagation is running: walk away
            raise Stop

    with pytest.raises(Stop):
        scripted.client.edit(VIDEO, "a cat", on_event=on_event)
    assert scripted.stages.ended.wait(5), "the stage call was not cancelled when the caller left"
    deadline = time.monotonic() + 5
    while scripted.requests("cancelled") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scripted.requests("cancelled") == 1


def test_editor_reports_unreachable_stages_as_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    """STAGE_UNAVAILABLE comes after the Editor's own wait and failover: the client passes it on at once
    instead of re-sending the edit (it re-sends only cut streams and draining replicas)."""
    metrics = Metrics()
    editor = EditorServicer(
        "127.0.0.1:1",
        "127.0.0.1:1",
        "127.0.0.1:1",
        None,  # type: ignore[arg-type]
        metrics,
        stage_wait_seconds=1.0,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor(metrics)])
    add_to_server(server, editor)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TokenFlowClient(f"127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(ClientError) as info, caplog.at_level(logging.WARNING, "clients.client"):
                client.edit(VIDEO, "a cat")
        assert not [r for r in caplog.records if "re-attaching" in r.getMessage()]
        error = info.value
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "STAGE_UNAVAILABLE"
        assert error.retryable and error.metadata == {"stage": "inversion"}
        # No internal address reaches the caller, only the stage's name.
        assert "inversion stage" in error.message
        assert "127.0.0.1" not in error.message and "ipv4" not in error.message
    finally:
        server.stop(grace=None)
        editor.close()


def test_editor_requires_stage_addresses() -> None:
    with pytest.raises(ValueError, match="inversion"):
        EditorServicer("", "h:1", "h:1", None, Metrics())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# The real services on the tiny model

FRAMES = 6
DECODE = decode_spec(size=(64, 64))
INVERSION = inversion_spec(steps=4, edit_steps=2, reconstruct=False)
PROMPT_A = edit_spec("a watercolor painting", seed=3)
PROMPT_B = edit_spec("a marble sculpture", seed=3)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenflow.synthetic import make_clip

    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=(64, 64), fps=8, audio=True
    )


class Recorder:
    """on_event callback keeping the Editor's events."""

    def __init__(self) -> None:
        self.events: list[editor_pb2.EditResponse] = []

    def __call__(self, event: editor_pb2.EditResponse) -> None:
        self.events.append(event)

    def inversion_result(self) -> common_pb2.Result:
        (result,) = [
            e.result for e in self.events if e.edit_index == -1 and e.WhichOneof("event") == "result"
        ]
        return result

    def progress(self, index: int) -> list[common_pb2.Progress]:
        return [e.progress for e in self.events if e.edit_index == index and e.HasField("progress")]


def check_video(client: TokenFlowClient, result: common_pb2.Result, dest: Path) -> None:
    """The result downloads as an mp4 with the source's frame count and its audio."""
    from tokenflow.video import count_frames, probe

    path = client.download(result.digest, dest)
    assert path == dest and dest.stat().st_size > 0
    assert count_frames(dest) == FRAMES
    info = probe(dest)
    assert (info.width, info.height) == (64, 64)
    assert info.has_audio
    assert result.propagation.frames == FRAMES


def run_edit_flow(
    client: TokenFlowClient, clip: Path, out: Path, metrics_port: int | None, editor_metrics_port: int | None
) -> None:
    """Cold edit under A, warm edit under B (no second inversion), A again (computed once).

    `metrics_port` serves the stages' metrics, `editor_metrics_port` the Editor's (the same in one process).
    """
    video = client.upload(clip)
    before = scrape(metrics_port) if metrics_port is not None else None

    cold = Recorder()
    (result_a,) = client.edit(video, PROMPT_A, decode=DECODE, inversion=INVERSION, on_event=cold, timeout=300)
    assert not cold.inversion_result().cache_hit
    assert cold.progress(-1), "the inversion's progress is streamed with edit_index -1"
    assert cold.progress(0), "the edit's progress is streamed with its index"
    assert result_a.kind == common_pb2.ARTIFACT_KIND_PROPAGATION
    assert not result_a.cache_hit and result_a.test_model

    warm = Recorder()
    (result_b,) = client.edit(video, PROMPT_B, decode=DECODE, inversion=INVERSION, on_event=warm, timeout=300)
    assert warm.inversion_result().cache_hit, "the second edit must reuse the inversion"
    assert warm.inversion_result().digest == cold.inversion_result().digest
    assert not result_b.cache_hit and result_b.digest != result_a.digest

    if metrics_port is not None:
        assert before is not None
        after_b = scrape(metrics_port)
        assert (
            metric(after_b, "tokenflow_inversions_total") - metric(before, "tokenflow_inversions_total") == 1
        )
        hits = "tokenflow_cache_hits_total"
        assert metric(after_b, hits, kind="inversion") > metric(before, hits, kind="inversion")

    (again,) = client.edit(video, PROMPT_A, decode=DECODE, inversion=INVERSION, timeout=300)
    assert again.cache_hit and again.digest == result_a.digest

    if metrics_port is not None:
        after_again = scrape(metrics_port)
        jobs = "tokenflow_jobs_total"  # every stage's
        assert metric(after_again, jobs) == metric(after_b, jobs), "a repeated request must not compute"
        assert metric(after_again, "tokenflow_inversions_total") == metric(
            after_b, "tokenflow_inversions_total"
        )

    if editor_metrics_port is not None:
        editor_samples = scrape(editor_metrics_port)
        ok = metric(editor_samples, "tokenflow_requests_total", service="editor", method="Edit", outcome="ok")
        assert ok >= 3

    check_video(client, result_a, out / "a.mp4")
    check_video(client, result_b, out / "b.mp4")


def test_single_process_edits_share_one_inversion(tmp_path: Path, clip: Path) -> None:
    from services.server import build_server

    server = build_server(tiny_server_config(tmp_path / "cache", metrics_port=0, job_grace_seconds=5))
    try:
        assert server.metrics_port is not None
        with TokenFlowClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            deadline = time.monotonic() + 60  # NOT_SERVING until the model is loaded and warmed
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.health() == "SERVING"
            run_edit_flow(client, clip, tmp_path, server.metrics_port, server.metrics_port)
    finally:
        server.stop(grace=0)


def test_stages_as_separate_processes_share_one_cache(tmp_path: Path, clip: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache"), "--cache-size", "2GB", "--model", "tiny"]
    common = [*cache, "--job-grace-seconds", "5"]
    processes: list[ServeProcess] = []
    try:
        stages = {
            "inversion": ServeProcess(
                "inversion", ["--services", "inversion", "--metrics-port", "0", *common], tmp_path
            ),
            "keyframes": ServeProcess(
                "keyframes", ["--services", "keyframes", "--metrics-port", "-1", *common], tmp_path
            ),
            "propagation": ServeProcess(
                "propagation", ["--services", "propagation", "--metrics-port", "-1", *common], tmp_path
            ),
        }
        processes.extend(stages.values())
        for process in stages.values():
            process.wait_serving()
        editor = ServeProcess(
            "editor",
            [
                "--services",
                "editor",
                "--metrics-port",
                "0",
                *common,
                "--inversion-addr",
                stages["inversion"].target,
                "--keyframes-addr",
                stages["keyframes"].target,
                "--propagation-addr",
                stages["propagation"].target,
            ],
            tmp_path,
        )
        processes.append(editor)
        editor.wait_serving()

        with TokenFlowClient(editor.target, timeout=60) as client:
            assert client.health("tokenflow.v1.Editor") == "SERVING"
            # The inversion process's metrics prove the second edit did not invert again.
            run_edit_flow(client, clip, tmp_path, stages["inversion"].metrics_port, editor.metrics_port)
            (preview,) = client.edit(clip, PROMPT_B, decode=DECODE, inversion=INVERSION, keyframes_only=True)
            assert preview.kind == common_pb2.ARTIFACT_KIND_KEYFRAMES
            assert len(preview.keyframes.image_files) >= 1
            png = client.download(preview.digest, tmp_path / "k.png", name=preview.keyframes.image_files[0])
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        for process in processes:
            code = process.terminate()
            assert code == 0, (
                f"{process.name} exited with {code} on SIGTERM: {process.log_path.read_text()[-3000:]}"
            )
    finally:
        for process in processes:
            process.close()
