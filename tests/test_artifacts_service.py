"""The Artifacts service on a real gRPC server (loopback, ephemeral port) with real stubs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.artifacts import CHUNK_SIZE, SERVICE_NAME, ArtifactsServicer, add_to_server
from services.errors import ErrorInterceptor
from services.metrics import Metrics
from services.store import ArtifactStore
from tokenflow_pb.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2

VIDEO = common_pb2.ARTIFACT_KIND_VIDEO

MiB = 1 << 20
MAX_UPLOAD = 12 * MiB


class Server:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.servicer = ArtifactsServicer(store, max_upload_bytes=MAX_UPLOAD)
        self.metrics = Metrics()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor(self.metrics)]
        )
        add_to_server(self.server, self.servicer)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = artifacts_pb2_grpc.ArtifactsStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    store = ArtifactStore(tmp_path / "cache", size_limit=64 * MiB)
    s = Server(store)
    yield s
    s.close()
    store.close()


def upload_requests(
    data: bytes,
    filename: str = "clip.mp4",
    sha256: str = "",
    total_size: int | None = None,
    kind: int = VIDEO,
) -> Iterator[artifacts_pb2.UploadRequest]:
    yield artifacts_pb2.UploadRequest(
        header=artifacts_pb2.UploadHeader(
            kind=kind,
            filename=filename,
            total_size=len(data) if total_size is None else total_size,
            sha256=sha256,
            media_type="video/mp4",
        )
    )
    for i in range(0, len(data), CHUNK_SIZE):
        yield artifacts_pb2.UploadRequest(chunk=data[i : i + CHUNK_SIZE])


def download(
    stub: artifacts_pb2_grpc.ArtifactsStub, digest: str, name: str = "", offset: int = 0
) -> tuple[artifacts_pb2.DownloadHeader, list[artifacts_pb2.DownloadResponse]]:
    messages = list(stub.Download(artifacts_pb2.DownloadRequest(digest=digest, name=name, offset=offset)))
    assert messages[0].WhichOneof("payload") == "header"
    assert all(m.WhichOneof("payload") == "chunk" for m in messages[1:])
    return messages[0].header, messages[1:]


UNARY_RESPONSES = (
    artifacts_pb2.UploadResponse,
    artifacts_pb2.GetResponse,
    artifacts_pb2.ListResponse,
    artifacts_pb2.DeleteResponse,
)


def error_of(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if not isinstance(result, UNARY_RESPONSES):
            list(result)
    return info.value


def code_of(call: Any, *args: Any) -> tuple[grpc.StatusCode, str]:
    error = error_of(call, *args)
    return error.code(), error.details()


def error_info(
    error: grpc.RpcError,
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo | None]:
    """The ErrorInfo and RetryInfo (None when absent) of a failed call's google.rpc.Status."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None and status.code == error.code().value[0]
    info, retry = error_details_pb2.ErrorInfo(), None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    assert info.domain == "tokenflow.v1"
    return info, retry


def assert_still_serving(srv: Server) -> None:
    ref = srv.stub.Upload(upload_requests(b"still alive"))
    assert ref.digest == hashlib.sha256(b"still alive").hexdigest()


def test_upload_and_download_10_mib(srv: Server) -> None:
    data = os.urandom(10 * MiB + 123)
    digest = hashlib.sha256(data).hexdigest()
    ref = srv.stub.Upload(upload_requests(data, sha256=digest))
    assert ref.digest == digest and ref.kind == VIDEO and ref.size == len(data)
    assert ref.primary == "source.mp4" and not ref.existed
    assert srv.stub.Upload(upload_requests(data)).existed  # content-addressed: stored once

    header, chunks = download(srv.stub, digest)
    assert header.digest == digest and header.kind == VIDEO and header.name == "source.mp4"
    assert header.size == len(data) and header.sha256 == digest and header.media_type == "video/mp4"
    assert header.filename == "clip.mp4"
    assert b"".join(c.chunk for c in chunks) == data
    # No message anywhere near the 4 MiB limit: every payload is at most 1 MiB.
    assert max(len(c.chunk) for c in chunks) <= MiB
    assert max(c.ByteSize() for c in chunks) <= MiB + 16
    assert len(chunks) == 11

    # Resume from an offset.
    header, chunks = download(srv.stub, digest, offset=5 * MiB + 7)
    assert header.offset == 5 * MiB + 7 and b"".join(c.chunk for c in chunks) == data[5 * MiB + 7 :]

    before = time.time()
    info = srv.stub.Get(artifacts_pb2.GetRequest(digest=digest)).artifact
    assert abs(info.create_time.ToNanoseconds() / 1e9 - before) < 120
    assert info.kind == VIDEO and info.total_size == len(data) and info.primary == "source.mp4"
    assert [(f.name, f.size, f.sha256) for f in info.files] == [("source.mp4", len(data), digest)]
    assert json.loads(info.meta_json)["filename"] == "clip.mp4"
    assert list(srv.store.tmp_dir.iterdir()) == []  # the upload's temp file is gone


def test_non_mp4_upload_is_stored_as_raw_source(srv: Server) -> None:
    ref = srv.stub.Upload(upload_requests(b"\x1aE\xdf\xa3webm", filename="C:\\clips\\dance.webm"))
    assert ref.primary == "source.bin"
    header, chunks = download(srv.stub, ref.digest)
    assert header.filename == "dance.webm" and header.media_type == "application/octet-stream"
    assert b"".join(c.chunk for c in chunks) == b"\x1aE\xdf\xa3webm"


def test_unknown_and_malformed_digests(srv: Server) -> None:
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    error = error_of(srv.stub.Download, artifacts_pb2.DownloadRequest(digest=unknown))
    assert error.code() is grpc.StatusCode.NOT_FOUND and "Artifacts.Upload" in error.details()
    assert error_info(error)[0].reason == "ARTIFACT_NOT_FOUND"
    code, _ = code_of(srv.stub.Get, artifacts_pb2.GetRequest(digest=unknown))
    assert code is grpc.StatusCode.NOT_FOUND
    for bad in ["", "xyz", "../../etc/passwd", unknown.upper()]:
        code, details = code_of(srv.stub.Download, artifacts_pb2.DownloadRequest(digest=bad))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "64" in details
    ref = srv.stub.Upload(upload_requests(b"abc"))
    code, details = code_of(srv.stub.Download, artifacts_pb2.DownloadRequest(digest=ref.digest, name="x.png"))
    assert code is grpc.StatusCode.NOT_FOUND and "source.mp4" in details
    assert_still_serving(srv)


def test_too_large_upload_is_refused_and_nothing_published(srv: Server) -> None:
    data = os.urandom(MAX_UPLOAD + 1)
    error = error_of(srv.stub.Upload, upload_requests(data, total_size=0))  # size not announced
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in error.details()
    info, retry = error_info(error)  # too large: told apart from a full queue by its details
    assert info.reason == "INPUT_TOO_LARGE" and retry is None
    assert dict(info.metadata) == {"limit_name": "max_upload_bytes", "limit": str(MAX_UPLOAD)}
    code, _ = code_of(srv.stub.Upload, upload_requests(b"x", total_size=MAX_UPLOAD + 1))  # announced
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not srv.store.contains(hashlib.sha256(data).hexdigest())
    assert srv.store.total_bytes() == 0 and list(srv.store.tmp_dir.iterdir()) == []
    assert_still_serving(srv)


def test_sha_mismatch_and_bad_headers(srv: Server) -> None:
    data = b"some video bytes"
    wrong = hashlib.sha256(b"other").hexdigest()
    code, details = code_of(srv.stub.Upload, upload_requests(data, sha256=wrong))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "sha256" in details
    assert not srv.store.contains(hashlib.sha256(data).hexdigest()) and srv.store.total_bytes() == 0

    no_header = iter([artifacts_pb2.UploadRequest(chunk=b"abc")])
    code, details = code_of(srv.stub.Upload, no_header)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "header" in details
    code, _ = code_of(srv.stub.Upload, iter([]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(srv.stub.Upload, upload_requests(b""))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(srv.stub.Upload, upload_requests(data, total_size=len(data) + 1))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(srv.stub.Upload, upload_requests(data, kind=common_pb2.ARTIFACT_KIND_INVERSION))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(srv.stub.Upload, upload_requests(data, kind=common_pb2.ARTIFACT_KIND_UNSPECIFIED))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    two_headers = list(upload_requests(data))
    code, _ = code_of(srv.stub.Upload, iter([two_headers[0], two_headers[0], *two_headers[1:]]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert srv.store.total_bytes() == 0
    assert_still_serving(srv)


def test_corrupt_artifact_is_never_served(srv: Server) -> None:
    data = os.urandom(100_000)
    ref = srv.stub.Upload(upload_requests(data))
    (blob,) = srv.store.directory.rglob("*.val")
    blob.write_bytes(b"\0" * len(data))
    code, details = code_of(srv.stub.Download, artifacts_pb2.DownloadRequest(digest=ref.digest))
    assert code is grpc.StatusCode.ABORTED and "corrupt" in details  # retryable: re-upload or recompute
    assert not srv.store.contains(ref.digest)
    assert srv.stub.Upload(upload_requests(data)).digest == ref.digest  # re-upload repairs it
    assert b"".join(c.chunk for c in download(srv.stub, ref.digest)[1]) == data


def test_internal_errors_do_not_leak(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret /srv/cache/path exploded")

    monkeypatch.setattr(srv.store, "stat", broken)
    error = error_of(srv.stub.Get, artifacts_pb2.GetRequest(digest="0" * 64))
    code, details = error.code(), error.details()
    assert code is grpc.StatusCode.INTERNAL and "secret" not in details and "internal error" in details
    info, retry = error_info(error)
    assert info.reason == "INTERNAL" and info.metadata["error_id"] in details and retry is None
    assert_still_serving(srv)


def test_bytes_that_change_during_a_download_end_it_with_data_loss(srv: Server) -> None:
    data = os.urandom(11 * MiB)
    ref = srv.stub.Upload(upload_requests(data))
    (blob,) = srv.store.directory.rglob("*.val")
    stream = srv.stub.Download(artifacts_pb2.DownloadRequest(digest=ref.digest))
    first = next(stream)
    assert first.WhichOneof("payload") == "header"  # verified and started: now the bytes on disk change
    with open(blob, "r+b") as f:
        f.seek(len(data) - 100)
        f.write(b"\0" * 100)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() is grpc.StatusCode.DATA_LOSS and "discard" in info.value.details()
    reason, retry = error_info(info.value)
    assert reason.reason == "DATA_LOSS" and retry is not None


def test_list_pages_through_one_kind(srv: Server) -> None:
    digests = sorted(srv.stub.Upload(upload_requests(f"clip {i}".encode())).digest for i in range(5))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = srv.stub.List(artifacts_pb2.ListRequest(kind=VIDEO, page_size=2, page_token=token))
        assert len(page.artifacts) <= 2 and all(a.kind == VIDEO for a in page.artifacts)
        seen.extend(a.digest for a in page.artifacts)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == digests and pages == 3  # in digest order, each exactly once
    (first,) = srv.stub.List(artifacts_pb2.ListRequest(kind=VIDEO, page_size=1)).artifacts
    assert first.files[0].name == "source.mp4" and first.create_time.seconds > 0
    everything = srv.stub.List(artifacts_pb2.ListRequest(kind=VIDEO))  # default page size
    assert [a.digest for a in everything.artifacts] == digests and not everything.next_page_token
    none = srv.stub.List(artifacts_pb2.ListRequest(kind=common_pb2.ARTIFACT_KIND_INVERSION))
    assert not none.artifacts and not none.next_page_token


def test_list_refuses_bad_requests_with_the_field(srv: Server) -> None:
    video_page = srv.stub.List(artifacts_pb2.ListRequest(kind=VIDEO, page_size=1))
    srv.stub.Upload(upload_requests(b"one"))
    srv.stub.Upload(upload_requests(b"two"))
    token = srv.stub.List(artifacts_pb2.ListRequest(kind=VIDEO, page_size=1)).next_page_token
    assert token and not video_page.artifacts
    bad = {
        "kind": artifacts_pb2.ListRequest(),
        "page_size": artifacts_pb2.ListRequest(kind=VIDEO, page_size=-1),
        "page_token": artifacts_pb2.ListRequest(kind=common_pb2.ARTIFACT_KIND_INVERSION, page_token=token),
    }
    for field, request in bad.items():
        error = error_of(srv.stub.List, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        info, _ = error_info(error)
        assert info.reason == "INVALID_SPEC" and info.metadata["field"] == field
    error = error_of(srv.stub.List, artifacts_pb2.ListRequest(kind=VIDEO, page_token="garbage"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_delete_removes_an_artifact_and_refuses_one_in_use(srv: Server) -> None:
    data = os.urandom(1000)
    ref = srv.stub.Upload(upload_requests(data))
    with srv.store.pin(ref.digest):  # what a running job holds on its inputs
        error = error_of(srv.stub.Delete, artifacts_pb2.DeleteRequest(digest=ref.digest))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and "in use" in error.details()
        info, retry = error_info(error)
        assert info.reason == "ARTIFACT_IN_USE" and retry is not None
        assert srv.store.contains(ref.digest)
    srv.stub.Delete(artifacts_pb2.DeleteRequest(digest=ref.digest))
    assert not srv.store.contains(ref.digest)
    code, _ = code_of(srv.stub.Get, artifacts_pb2.GetRequest(digest=ref.digest))
    assert code is grpc.StatusCode.NOT_FOUND
    error = error_of(srv.stub.Delete, artifacts_pb2.DeleteRequest(digest=ref.digest))  # already gone
    assert error.code() is grpc.StatusCode.NOT_FOUND and error_info(error)[0].reason == "ARTIFACT_NOT_FOUND"
    code, _ = code_of(srv.stub.Delete, artifacts_pb2.DeleteRequest(digest="nope"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    again = srv.stub.Upload(upload_requests(data))  # can be uploaded again
    assert again.digest == ref.digest and not again.existed and srv.store.contains(ref.digest)


def test_service_name() -> None:
    assert SERVICE_NAME == "tokenflow.v1.Artifacts"
