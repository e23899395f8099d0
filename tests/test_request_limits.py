"""The request limits a server may tighten (--max-prompt-chars, --max-steps, --max-edits-per-request,
--max-schedule-entries), on a real in-process server on loopback: a request over each limit is refused
before any job with RESOURCE_EXHAUSTED naming the limit and its value, one under it runs, ServerInfo
reports every configured limit, and a limit above the library's own is refused at start-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from loopback import tiny_server_config

from services.config import ServerConfig, config_from_args, parse_args
from services.model_host import ModelHost
from services.request_limits import HARD_LIMITS
from services.server import RunningServer, build_server, main
from tests.rpc_client import status_of
from tokenflow.specs import DEFAULT_NEGATIVE_PROMPT, MAX_PROMPT_CHARS
from tokenflow.synthetic import make_clip
from tokenflow_pb.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    editor_pb2,
    editor_pb2_grpc,
    inversion_pb2,
    inversion_pb2_grpc,
    keyframes_pb2,
    keyframes_pb2_grpc,
    server_info_pb2,
    server_info_pb2_grpc,
)

LIMITS = {"max_prompt_chars": 20, "max_steps": 8, "max_edits_per_request": 2, "max_schedule_entries": 6}
DECODE = common_pb2.DecodeSpec(width=64, height=64)
INVERSION = common_pb2.InversionSpec(steps=4, edit_steps=2, prompt="x" * 20)
UNKNOWN = "0" * 64
OK_PROMPT = "a watercolour cat..."  # 20 characters: at the limit
LONG_PROMPT = OK_PROMPT + "!"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    host = ModelHost("tiny", device="cpu")
    config = tiny_server_config(
        tmp_path_factory.mktemp("limits") / "cache",
        cache_size_bytes=200 << 20,
        preload_model=False,
        max_concurrent_rpcs=40,
        upload_idle_seconds=7.5,
        max_decoded_frames=500,
        max_pixels_per_frame=1 << 20,
        **LIMITS,
    )
    running = build_server(config, model_host=host)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def inverted(channel: grpc.Channel, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real clip inverted under the limits: (video digest, inversion digest)."""
    data = make_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames=4, size=(64, 64), fps=8).read_bytes()
    header = artifacts_pb2.UploadHeader(
        kind=common_pb2.ARTIFACT_KIND_VIDEO, filename="c.mp4", total_size=len(data)
    )
    video = (
        artifacts_pb2_grpc.ArtifactsStub(channel)
        .Upload(iter([artifacts_pb2.UploadRequest(header=header), artifacts_pb2.UploadRequest(chunk=data)]))
        .digest
    )
    events = list(invert(channel, video, INVERSION))
    assert events[-1].WhichOneof("event") == "result"
    return video, events[-1].result.digest


def invert(channel: grpc.Channel, video: str, inversion: common_pb2.InversionSpec) -> Iterator[object]:
    request = inversion_pb2.InvertRequest(video_digest=video, decode=DECODE, inversion=inversion)
    return inversion_pb2_grpc.InversionStub(channel).Invert(request, timeout=60)


def preview(channel: grpc.Channel, inversion: str, edit: common_pb2.EditSpec) -> Iterator[object]:
    request = keyframes_pb2.EditKeyframesRequest(inversion_digest=inversion, edit=edit)
    return keyframes_pb2_grpc.KeyframesStub(channel).EditKeyframes(request, timeout=60)


def refused(call: object) -> tuple[grpc.StatusCode, str, dict, list]:
    with pytest.raises(grpc.RpcError) as info:
        list(call)  # type: ignore[call-overload]
    return status_of(info.value)


def assert_over(status: tuple[grpc.StatusCode, str, dict, list], limit_name: str, field: str) -> None:
    code, reason, metadata, others = status
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "INPUT_TOO_LARGE", status
    assert metadata == {"limit_name": limit_name, "limit": str(LIMITS[limit_name]), "field": field}
    quota = [o for o in others if isinstance(o, error_details_pb2.QuotaFailure)]
    assert quota and quota[0].violations[0].subject == limit_name, others
    assert f"{limit_name} = {LIMITS[limit_name]}" in quota[0].violations[0].description
    assert not any(isinstance(o, error_details_pb2.RetryInfo) for o in others)  # final, not retryable


def test_inversion_prompt_and_steps_over_the_limits_are_refused_before_any_job(
    channel: grpc.Channel, inverted: tuple[str, str]
) -> None:
    video, _ = inverted
    over_steps = common_pb2.InversionSpec(steps=16, edit_steps=2)
    assert_over(refused(invert(channel, video, over_steps)), "max_steps", "inversion.steps")
    over_edit_steps = common_pb2.InversionSpec(steps=9, edit_steps=9)
    assert_over(refused(invert(channel, video, over_edit_steps)), "max_steps", "inversion.steps")
    long_prompt = common_pb2.InversionSpec(steps=4, edit_steps=2, prompt="x" * 21)
    assert_over(refused(invert(channel, video, long_prompt)), "max_prompt_chars", "inversion.prompt")
    # Beyond the library's own limit it is invalid anywhere: INVALID_ARGUMENT, as without a server limit.
    code, reason, _, _ = refused(invert(channel, video, common_pb2.InversionSpec(steps=2000, edit_steps=2)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC")


def test_edit_prompt_and_schedule_over_the_limits_are_refused_and_under_them_run(
    channel: grpc.Channel, inverted: tuple[str, str]
) -> None:
    _, inversion = inverted
    status = refused(preview(channel, inversion, common_pb2.EditSpec(prompt=LONG_PROMPT)))
    assert_over(status, "max_prompt_chars", "edit.prompt")
    status = refused(
        preview(channel, inversion, common_pb2.EditSpec(prompt="a", negative_prompt=LONG_PROMPT))
    )
    assert_over(status, "max_prompt_chars", "edit.negative_prompt")
    schedule = [common_pb2.KeyframeRow(frames=[0] * 7)]
    status = refused(preview(channel, inversion, common_pb2.EditSpec(prompt="a", keyframe_schedule=schedule)))
    assert_over(status, "max_schedule_entries", "edit.keyframe_schedule")
    # Refused before the inversion is even looked up: an unknown one gets the limit, not NOT_FOUND.
    assert_over(
        refused(preview(channel, UNKNOWN, common_pb2.EditSpec(prompt=LONG_PROMPT))),
        "max_prompt_chars",
        "edit.prompt",
    )

    # At the limits it runs; the default negative prompt (longer than 20) is the server's, not the caller's.
    assert len(DEFAULT_NEGATIVE_PROMPT) > LIMITS["max_prompt_chars"]
    ok = common_pb2.EditSpec(prompt=OK_PROMPT, keyframe_schedule=[common_pb2.KeyframeRow(frames=[3])] * 2)
    events = list(preview(channel, inversion, ok))
    assert events[-1].WhichOneof("event") == "result" and events[-1].result.digest


def test_the_editor_refuses_too_many_edits_and_a_late_edit_over_a_limit_before_inverting(
    channel: grpc.Channel, inverted: tuple[str, str]
) -> None:
    video, _ = inverted
    editor = editor_pb2_grpc.EditorStub(channel)

    def edit(
        *edits: common_pb2.EditSpec, inversion: common_pb2.InversionSpec = INVERSION
    ) -> Iterator[object]:
        request = editor_pb2.EditRequest(
            video_digest=video, decode=DECODE, inversion=inversion, edits=list(edits), keyframes_only=True
        )
        return editor.Edit(request, timeout=60)

    a, b = common_pb2.EditSpec(prompt="a cat"), common_pb2.EditSpec(prompt="a dog")
    assert_over(refused(edit(a, b, a)), "max_edits_per_request", "edits")
    assert_over(
        refused(edit(a, common_pb2.EditSpec(prompt=LONG_PROMPT))), "max_prompt_chars", "edits[1].prompt"
    )
    over = common_pb2.InversionSpec(steps=16, edit_steps=2)
    assert_over(refused(edit(a, inversion=over)), "max_steps", "inversion.steps")
    results = [e for e in edit(a, b) if e.WhichOneof("event") == "result"]
    assert sorted(e.edit_index for e in results) == [-1, 0, 1]


def test_server_info_reports_every_configured_limit(channel: grpc.Channel, server: RunningServer) -> None:
    info = server_info_pb2_grpc.ServerInfoStub(channel).GetServerInfo(
        server_info_pb2.GetServerInfoRequest(), timeout=10
    )
    limits = info.limits
    assert (limits.max_prompt_chars, limits.max_steps, limits.max_schedule_entries) == (20, 8, 6)
    assert limits.max_edits_per_request == 2
    assert (limits.max_concurrent_rpcs, limits.max_decoded_frames, limits.max_pixels_per_frame) == (
        40,
        500,
        1 << 20,
    )
    assert limits.upload_idle.ToNanoseconds() == 7_500_000_000
    assert (
        limits.max_queue == server.config.max_queue
        and limits.max_upload_bytes == server.config.max_upload_bytes
    )
    assert limits.job_grace.ToNanoseconds() == int(server.config.job_grace_seconds * 1e9)
    assert limits.max_connection_age.ToNanoseconds() == int(server.config.max_connection_age_seconds * 1e9)
    assert limits.edit_parallelism >= 1
    # every declared limit is reported: none is left at its proto default
    assert {f.name for f, _ in limits.ListFields()} == {f.name for f in limits.DESCRIPTOR.fields}


def test_request_limit_flags_default_to_the_library_limits_and_may_only_tighten_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    defaults = config_from_args(parse_args([], environ={}))
    assert {name: getattr(defaults, name) for name in HARD_LIMITS} == HARD_LIMITS
    assert HARD_LIMITS["max_prompt_chars"] == MAX_PROMPT_CHARS
    tightened = config_from_args(
        parse_args(["--max-steps", "8"], environ={"TOKENFLOW_MAX_PROMPT_CHARS": "20"})
    )
    assert (tightened.max_steps, tightened.max_prompt_chars) == (8, 20)
    for name, hard in HARD_LIMITS.items():
        flag = "--" + name.replace("_", "-")
        for bad in (hard + 1, 0):
            assert (
                main([flag, str(bad), "--cache-dir", str(tmp_path), "--metrics-port", "-1", "--port", "0"])
                == 2
            )
            err = capsys.readouterr().err
            assert flag in err and str(hard) in err, err
        with pytest.raises(ValueError, match=flag):
            ServerConfig(cache_dir=tmp_path, **{name: hard + 1})
