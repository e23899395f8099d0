"""A small loopback client over the generated stubs for the server-process tests (hostile inputs, faults)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tokenflow_pb.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    inversion_pb2,
    inversion_pb2_grpc,
    keyframes_pb2_grpc,
    propagation_pb2_grpc,
)

MB = 1 << 20


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict, list]:
    """(code, ErrorInfo reason, ErrorInfo metadata, the other details) of a failed call."""
    status = rpc_status.from_call(error)
    reason, metadata, others = "", {}, []
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        else:
            for cls in (
                error_details_pb2.QuotaFailure,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
            ):
                if detail.Is(cls.DESCRIPTOR):
                    message = cls()
                    detail.Unpack(message)
                    others.append(message)
    return error.code(), reason, metadata, others


def vm_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class Client:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.artifacts = artifacts_pb2_grpc.ArtifactsStub(self.channel)
        self.inversion = inversion_pb2_grpc.InversionStub(self.channel)
        self.keyframes = keyframes_pb2_grpc.KeyframesStub(self.channel)
        self.propagation = propagation_pb2_grpc.PropagationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def upload(self, data: bytes, filename: str = "clip.mp4") -> str:
        def requests() -> Iterator[artifacts_pb2.UploadRequest]:
            yield artifacts_pb2.UploadRequest(
                header=artifacts_pb2.UploadHeader(
                    kind=common_pb2.ARTIFACT_KIND_VIDEO,
                    filename=filename,
                    total_size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
            for i in range(0, len(data), MB):
                yield artifacts_pb2.UploadRequest(chunk=data[i : i + MB])

        return self.artifacts.Upload(requests(), timeout=60).digest

    def invert(self, digest: str, max_frames: int = 4, **inversion: object) -> common_pb2.Result:
        request = inversion_pb2.InvertRequest(
            video_digest=digest,
            decode=common_pb2.DecodeSpec(max_frames=max_frames, width=64, height=64),
            inversion=common_pb2.InversionSpec(
                **{"steps": 2, "edit_steps": 2, "reconstruct": False, **inversion}  # type: ignore[arg-type]
            ),
        )
        result = None
        for event in self.inversion.Invert(request, timeout=300):
            if event.WhichOneof("event") == "result":
                result = event.result
        assert result is not None
        return result

    def refused(self, call: object) -> tuple[grpc.StatusCode, str, dict, list]:
        with pytest.raises(grpc.RpcError) as info:
            result = call()  # type: ignore[operator]
            if isinstance(result, Iterator):
                list(result)
        return status_of(info.value)

    def health_seconds(self) -> tuple[int, float]:
        started = time.perf_counter()
        answer = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return answer.status, time.perf_counter() - started


def invert_request(
    digest: str, max_frames: int = 4, size: int = 64, **inversion: object
) -> inversion_pb2.InvertRequest:
    return inversion_pb2.InvertRequest(
        video_digest=digest,
        decode=common_pb2.DecodeSpec(max_frames=max_frames, width=size, height=size),
        inversion=common_pb2.InversionSpec(
            **{"steps": 2, "edit_steps": 2, "reconstruct": False, **inversion}  # type: ignore[arg-type]
        ),
    )


def result_of(responses: Iterator[object]) -> common_pb2.Result:
    """The Result at the end of a stage's event stream."""
    result = None
    for event in responses:
        if event.WhichOneof("event") == "result":  # type: ignore[attr-defined]
            result = event.result  # type: ignore[attr-defined]
    assert result is not None
    return result


def wait_for_progress(responses: Iterator[object], step: int = 1) -> common_pb2.Progress:
    """Read a stage's event stream until a computed step (not a cache hit) has been reported."""
    for event in responses:
        if event.WhichOneof("event") == "result":  # type: ignore[attr-defined]
            raise AssertionError("the job finished before it could be interrupted")
        progress = event.progress  # type: ignore[attr-defined]
        if progress.step >= step and not progress.cache_hit:
            return progress
    raise AssertionError("the stream ended without progress")


def wait_health(client: Client, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = client.health_seconds()
        except grpc.RpcError:
            status = -1
        if status == want:
            return
        assert time.monotonic() < deadline, f"health never became {want} (last {status})"
        time.sleep(0.2)
