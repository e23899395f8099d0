"""`TokenFlowClient`: upload a video, run the stages or the Editor, download results.

Every call can carry a deadline (the client's `timeout`, overridable per call); long calls stream job
events to an optional `on_event` callback and return the final `Result` message. Any gRPC failure is
raised as `ClientError` with the server's status code and message, so callers never handle raw
`grpc.RpcError`s. If a callback raises (or the caller is interrupted), the running call is cancelled,
which lets the server drop a job nobody waits for. A job's stream that is cut (UNAVAILABLE: a server's
connection age, a restart behind a load balancer) is sent again and re-attaches to the same job, so a
long edit survives its connections; a cut download goes on from the bytes it has.

Only grpc, grpc-health-checking, grpcio-status (with googleapis-common-protos) and the generated
``tokenflow_pb`` code are imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import grpc
from google.longrunning import operations_pb2_grpc, operations_proto_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from clients.channels import RETRY, channel_credentials, make_channel, unary_methods_of
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
    propagation_pb2,
    propagation_pb2_grpc,
    server_info_pb2,
)
from tokenflow_pb.v1 import operations_pb2 as _operations_pb2  # registers OperationMetadata for Any

__all__ = [
    "CHUNK_SIZE",
    "CHANNEL_OPTIONS",
    "STAGES",
    "ClientError",
    "TokenFlowClient",
    "JobEvent",
    "decode_spec",
    "edit_spec",
    "enum_name",
    "enum_number",
    "inversion_spec",
    "is_digest",
    "kind_name",
    "phase_name",
    "seconds",
    "stage_name",
]

CHUNK_SIZE = 1 << 20
"""Upload chunk size (1 MiB): the API's per-message limit for payload pieces."""

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Download chunks are 1 MiB and results are small; 16 MiB leaves room without being unbounded.
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    # Detect a dead server during long, quiet jobs. Five minutes matches gRPC servers' default minimum
    # ping interval, so a server with default settings never answers our pings with GOAWAY.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)

STAGES = ("inversion", "keyframes", "propagation")
REATTACH_ATTEMPTS = 5
"""Re-sends of a job call whose stream was cut (UNAVAILABLE), in a row without a message between."""
_REATTACH_REASONS = ("", "SHUTTING_DOWN")
"""The UNAVAILABLE worth re-sending: a cut without the server's details (its connection age, a reset, a
restart) or a draining replica (another one takes the job). The others (STAGE_UNAVAILABLE,
STORE_UNAVAILABLE) come after the server's own retries and failover; the caller decides on those."""
TOKEN_ENV = "TOKENFLOW_TOKEN"
"""The environment variable a client reads its bearer token from when none is passed."""
_API_FILES = (
    artifacts_pb2.DESCRIPTOR,
    inversion_pb2.DESCRIPTOR,
    keyframes_pb2.DESCRIPTOR,
    propagation_pb2.DESCRIPTOR,
    editor_pb2.DESCRIPTOR,
    server_info_pb2.DESCRIPTOR,
)
_HEALTH_SERVICE = "grpc.health.v1.Health"

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

JobEvent = Union[  # noqa: UP007 - a runtime alias of message classes
    inversion_pb2.InvertResponse, keyframes_pb2.EditKeyframesResponse, propagation_pb2.PropagateResponse
]
"""A stage job's stream message: a oneof `event` of `progress` (Progress) or `result` (Result)."""
JobEventCallback = Callable[[Any], None]
"""Called with each JobEvent of a stage call."""
EditorEventCallback = Callable[[editor_pb2.EditResponse], None]
ByteProgress = Callable[[int, int], None]
"""Called with (bytes done, bytes in total; 0 when unknown) as a transfer advances."""


class ClientError(Exception):
    """A call failed: `code` is the gRPC status code, `message` the server's explanation.

    The status details the server sends (google.rpc.Status) are decoded so callers can branch without
    reading text: `reason` (ErrorInfo.reason, e.g. "QUEUE_FULL", "INPUT_TOO_LARGE", "INVALID_SPEC",
    "ARTIFACT_NOT_FOUND"; "" when the status has none), `metadata` (ErrorInfo.metadata: the limit or
    field concerned), `retry_delay` (RetryInfo, seconds; None = retrying as is will not help) and
    `field_violations` ((field, description) pairs of a BadRequest, e.g. ("edit.guidance_scale", ...)).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.code = code
        self.message = " ".join((message or "").split()) or code.name.lower().replace("_", " ")
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations = list(field_violations)
        super().__init__(f"{code.name}: {self.message}")

    @property
    def retryable(self) -> bool:
        """True when the server said a retry can succeed (it sent RetryInfo)."""
        return self.retry_delay is not None

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        out = cls(code, details or str(error))
        status = None
        if isinstance(error, grpc.Call):
            with contextlib.suppress(Exception):  # malformed details: keep code and message
                status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out.reason, out.metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                out.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out.field_violations.extend((v.field, v.description) for v in bad.field_violations)
        return out


def is_digest(value: str) -> bool:
    """True for a content address: 64 lowercase hex characters."""
    return bool(_DIGEST_RE.match(value))


# ----------------------------------------------------------------------------------------------------------
# Enum values <-> the service's names: EDIT_METHOD_PER_FRAME <-> "per-frame", ARTIFACT_KIND_VIDEO <->
# "video", PHASE_INVERT <-> "invert" (the value name without the enum's UPPER_SNAKE prefix, lower case,
# "_" as "-"). 0 (*_UNSPECIFIED) is "".


def _prefix(enum: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"


def enum_name(enum: Any, number: int) -> str:
    """The short name of an enum value: enum_name(common_pb2.EditMethod, 3) == "per-frame"."""
    value = enum.DESCRIPTOR.values_by_number.get(number)
    if value is None or number == 0:
        return ""
    return value.name[len(_prefix(enum)) :].lower().replace("_", "-")


def enum_number(enum: Any, name: str | int, what: str = "") -> int:
    """The enum value of a short name ("per-frame", "per_frame", "PER_FRAME") or a number; ValueError.

    `what` names the value in the error message (default: the enum's name).
    """
    if isinstance(name, int):
        return name
    key = _prefix(enum) + name.strip().upper().replace("-", "_")
    value = enum.DESCRIPTOR.values_by_name.get(key)
    if value is None or value.number == 0:
        choices = ", ".join(enum_name(enum, v.number) for v in enum.DESCRIPTOR.values if v.number)
        raise ValueError(f"unknown {what or enum.DESCRIPTOR.name} {name!r}; choose one of: {choices}")
    return value.number


def kind_name(number: int) -> str:
    """ "video", "inversion", "keyframes" or "propagation" for an ArtifactKind value."""
    return enum_name(common_pb2.ArtifactKind, number)


def stage_name(number: int) -> str:
    """ "inversion", "keyframes" or "propagation" for a Stage value."""
    return enum_name(common_pb2.Stage, number)


def phase_name(number: int) -> str:
    """The phase's short name ("queued", "invert", "edit", ...) for a Phase value."""
    return enum_name(common_pb2.Phase, number)


def seconds(duration: Any) -> float:
    """A google.protobuf.Duration (Progress.eta / elapsed) in seconds."""
    return duration.seconds + duration.nanos / 1e9


# ----------------------------------------------------------------------------------------------------------
# Spec builders: plain keyword arguments -> proto messages. Unset optional fields stay unset, so the server
# applies its documented defaults (and can tell "default" from an explicit value).


def decode_spec(
    start: int = 0,
    max_frames: int = 0,
    stride: int | None = None,
    size: tuple[int, int] | None = None,
    target_area: int | None = None,
    width: int = 0,
    height: int = 0,
) -> common_pb2.DecodeSpec:
    """Frame range and size: `width` x `height` (or `size` = (width, height)); 0/None = automatic."""
    spec = common_pb2.DecodeSpec(start=start, max_frames=max_frames or 0, width=width, height=height)
    if stride is not None:
        spec.stride = stride
    if size is not None:
        spec.width, spec.height = int(size[0]), int(size[1])
    if target_area is not None:
        spec.target_area = target_area
    return spec


def inversion_spec(
    prompt: str = "",
    steps: int | None = None,
    edit_steps: int | None = None,
    reconstruct: bool | None = None,
    batch_size: int | None = None,
) -> common_pb2.InversionSpec:
    """DDIM inversion settings: `steps` inversion steps S, keeping `edit_steps` T (S a multiple of T)."""
    spec = common_pb2.InversionSpec(prompt=prompt)
    if steps is not None:
        spec.steps = steps
    if edit_steps is not None:
        spec.edit_steps = edit_steps
    if reconstruct is not None:
        spec.reconstruct = reconstruct
    if batch_size is not None:
        spec.batch_size = batch_size
    return spec


def edit_spec(
    prompt: str,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    method: str | int | None = None,
    pnp_attn_t: float | None = None,
    pnp_f_t: float | None = None,
    keyframe_interval: int | None = None,
    chunk_size: int | None = None,
    sdedit_start: float | None = None,
    crf: int | None = None,
    keyframe_schedule: Sequence[Sequence[int]] | None = None,
    propagation_weighting: str | int | None = None,
) -> common_pb2.EditSpec:
    """One edit. `method` is "tokenflow", "sdedit", "per-frame", "reconstruct" (or the enum value)."""
    spec = common_pb2.EditSpec(prompt=prompt)
    optional: dict[str, Any] = {
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance,
        "pnp_attn_t": pnp_attn_t,
        "pnp_f_t": pnp_f_t,
        "keyframe_interval": keyframe_interval,
        "chunk_size": chunk_size,
        "sdedit_start": sdedit_start,
        "crf": crf,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(spec, name, value)
    if seed is not None:
        spec.seed = seed
    if method is not None:
        spec.method = enum_number(common_pb2.EditMethod, method, "method")
    if propagation_weighting is not None:
        spec.propagation_weighting = enum_number(
            common_pb2.PropagationWeighting, propagation_weighting, "propagation_weighting"
        )
    for row in keyframe_schedule or ():
        spec.keyframe_schedule.add(frames=[int(f) for f in row])
    return spec


# ----------------------------------------------------------------------------------------------------------
# The client


class TokenFlowClient:
    """Client of one TokenFlow server (or load balancer) at `target` ("host:port").

    `timeout` is the default deadline in seconds of every call (None = no deadline); each method takes
    its own `timeout` to override it. Use as a context manager or call `close()`.

    Access control: `token` is sent as a bearer token on every call (None = the ``TOKENFLOW_TOKEN``
    environment variable, if set; "" = none). TLS with `tls_ca` (PEM CA bundle of the server's
    certificate; the system's roots when only `tls_cert` is given) and `tls_cert`/`tls_key` (this
    client's certificate for mutual TLS), or with ready-made `credentials`.
    """

    def __init__(
        self,
        target: str,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        if credentials is None and (tls_ca or tls_cert or tls_key):
            credentials = channel_credentials(tls_ca or None, tls_cert or None, tls_key or None)
        # Round robin over every address of the target (a DNS name with many records, an ipv4:/ipv6: list
        # or "host1:port,host2:port"), retries of UNAVAILABLE, bounded wait-for-ready: clients/channels.py.
        # Health checks stay fail-fast (no wait-for-ready): a probe must report a server that is down.
        services, unary = unary_methods_of(_API_FILES)
        self.channel = make_channel(
            target, options, [*services, _HEALTH_SERVICE], unary, credentials=credentials, token=token or None
        )
        self._artifacts = artifacts_pb2_grpc.ArtifactsStub(self.channel)
        self._inversion = inversion_pb2_grpc.InversionStub(self.channel)
        self._keyframes = keyframes_pb2_grpc.KeyframesStub(self.channel)
        self._propagation = propagation_pb2_grpc.PropagationStub(self.channel)
        self._editor = editor_pb2_grpc.EditorStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._operations = operations_pb2_grpc.OperationsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TokenFlowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; raises ClientError(UNAVAILABLE) after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError(
                grpc.StatusCode.UNAVAILABLE, f"no server answered at {self.target} within {timeout:g} s"
            ) from None

    # -- Artifacts -----------------------------------------------------------------------------------------

    def upload_ref(
        self,
        source: str | os.PathLike[str] | bytes,
        kind: str = "video",
        filename: str | None = None,
        progress: ByteProgress | None = None,
        timeout: float | None = None,
    ) -> artifacts_pb2.UploadResponse:
        """Upload a file (path) or bytes; returns the server's UploadResponse (digest, size, existed)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            size, sha = len(data), hashlib.sha256(data).hexdigest()
            name = filename or ""

            def pieces() -> Iterator[bytes]:
                for i in range(0, len(data), CHUNK_SIZE):
                    yield data[i : i + CHUNK_SIZE]

        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            size, sha = _file_sha256(path)
            name = filename or path.name

            def pieces() -> Iterator[bytes]:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK_SIZE):
                        yield chunk

        media_type = (mimetypes.guess_type(name)[0] or "") if name else ""
        header = artifacts_pb2.UploadHeader(
            kind=enum_number(common_pb2.ArtifactKind, kind, "kind"),
            filename=name,
            total_size=size,
            sha256=sha,
            media_type=media_type,
        )

        def requests() -> Iterator[artifacts_pb2.UploadRequest]:
            yield artifacts_pb2.UploadRequest(header=header)
            sent = 0
            for chunk in pieces():
                yield artifacts_pb2.UploadRequest(chunk=chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)

        with _translate_errors():
            return self._artifacts.Upload(requests(), timeout=self._timeout(timeout))

    def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        kind: str = "video",
        filename: str | None = None,
        progress: ByteProgress | None = None,
        timeout: float | None = None,
    ) -> str:
        """Upload a file (path) or bytes in 1 MiB chunks with its sha256; returns its digest."""
        ref = self.upload_ref(source, kind=kind, filename=filename, progress=progress, timeout=timeout)
        return ref.digest

    def download(
        self,
        digest: str,
        dest_path: str | os.PathLike[str],
        name: str = "",
        progress: ByteProgress | None = None,
        timeout: float | None = None,
    ) -> Path:
        """Download one file of an artifact ("" = its primary file) to `dest_path`; returns the path.

        If `dest_path` is an existing directory, the server's suggested file name is used inside it.
        The bytes go to a temporary file next to the destination, are checked against the header's
        size and sha256, and only then renamed into place: a failed download leaves nothing behind.
        A stream cut on the way (UNAVAILABLE: a connection's age, a restart) goes on from the bytes
        received, with ``DownloadRequest.offset``, as a job's stream re-attaches (`_follow_stream`).
        """
        dest = Path(dest_path)
        header: artifacts_pb2.DownloadHeader | None = None
        out: Any = None  # the part file, open once the first header named the destination
        tmp_path: Path | None = None
        sha = hashlib.sha256()
        received = 0
        expect_header = True

        def request() -> artifacts_pb2.DownloadRequest:
            nonlocal expect_header
            expect_header = True  # every attempt's stream starts with a header
            return artifacts_pb2.DownloadRequest(digest=digest, name=name, offset=received)

        def on_message(message: artifacts_pb2.DownloadResponse) -> None:
            nonlocal header, out, tmp_path, received, expect_header, dest
            if expect_header:
                if message.WhichOneof("payload") != "header":
                    raise ClientError(grpc.StatusCode.INTERNAL, "the download did not start with a header")
                expect_header = False
                again = message.header
                if header is None:
                    header = again
                    if dest.is_dir():
                        dest = dest / _safe_filename(header.filename or header.name or digest)
                    fd, tmp_path = _create_part_file(dest)
                    out = os.fdopen(fd, "wb")
                elif (again.size, again.sha256, again.offset) != (header.size, header.sha256, received):
                    raise ClientError(
                        grpc.StatusCode.DATA_LOSS,
                        f"the resumed download of {digest}/{header.name} is not the file it started "
                        f"(size {again.size}, sha256 {again.sha256}, offset {again.offset}); retry",
                    )
                return
            if message.WhichOneof("payload") != "chunk":
                return
            out.write(message.chunk)
            sha.update(message.chunk)
            received += len(message.chunk)
            if progress is not None:
                progress(received, header.size if header is not None else 0)

        try:
            _follow_stream(self._artifacts.Download, request, self._timeout(timeout), on_message)
            if out is not None:
                out.close()
            if header is None or tmp_path is None:
                raise ClientError(grpc.StatusCode.INTERNAL, "the download did not start with a header")
            if received != header.size:
                raise ClientError(
                    grpc.StatusCode.DATA_LOSS,
                    f"download of {digest}/{header.name} ended after {received} of {header.size} bytes",
                )
            if header.sha256 and sha.hexdigest() != header.sha256:
                raise ClientError(
                    grpc.StatusCode.DATA_LOSS,
                    f"download of {digest}/{header.name} does not match its sha256 "
                    f"({sha.hexdigest()} != {header.sha256}); nothing was written, retry",
                )
            os.replace(tmp_path, dest)
            tmp_path = None
            return dest
        finally:
            if out is not None:
                out.close()
            if tmp_path is not None:
                tmp_path.unlink(missing_ok=True)

    def stat(self, digest: str, timeout: float | None = None) -> artifacts_pb2.Artifact:
        """Describe an artifact (kind, files, metadata JSON) without transferring it (Artifacts.Get)."""
        with _translate_errors():
            request = artifacts_pb2.GetRequest(digest=digest)
            return self._artifacts.Get(request, timeout=self._timeout(timeout)).artifact

    def list_artifacts(
        self, kind: str | int, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> artifacts_pb2.ListResponse:
        """One page of the stored artifacts of `kind` ("video", "inversion", ...), in digest order.

        Pass the response's `next_page_token` for the next page ("" = this was the last one).
        """
        request = artifacts_pb2.ListRequest(
            kind=enum_number(common_pb2.ArtifactKind, kind, "kind"),
            page_size=page_size,
            page_token=page_token,
        )
        with _translate_errors():
            return self._artifacts.List(request, timeout=self._timeout(timeout))

    def iter_artifacts(
        self, kind: str | int, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[artifacts_pb2.Artifact]:
        """Every stored artifact of `kind`, page after page (`timeout` applies to each page)."""
        token = ""
        while True:
            page = self.list_artifacts(kind, page_size=page_size, page_token=token, timeout=timeout)
            yield from page.artifacts
            token = page.next_page_token
            if not token:
                return

    def delete(self, digest: str, timeout: float | None = None) -> None:
        """Delete an artifact; refused (FAILED_PRECONDITION, ARTIFACT_IN_USE) while a job uses it."""
        with _translate_errors():
            self._artifacts.Delete(artifacts_pb2.DeleteRequest(digest=digest), timeout=self._timeout(timeout))

    # -- Stages --------------------------------------------------------------------------------------------

    def invert(
        self,
        video_digest: str,
        decode: common_pb2.DecodeSpec | None = None,
        inversion: common_pb2.InversionSpec | None = None,
        on_event: JobEventCallback | None = None,
        timeout: float | None = None,
        features_for: common_pb2.EditSpec | None = None,
    ) -> common_pb2.Result:
        """DDIM-invert an uploaded video; returns the Result (its digest feeds keyframes/propagate).

        `features_for`: also precompute the source features of edits with this spec (any prompt), so
        the first Propagate of the clip already replays them (Result.inversion.features_digest).
        """
        request = inversion_pb2.InvertRequest(
            video_digest=video_digest, decode=decode, inversion=inversion, features_for=features_for
        )
        return _run_job(self._inversion.Invert, request, self._timeout(timeout), on_event)

    def keyframes(
        self,
        inversion_digest: str,
        edit: common_pb2.EditSpec | str,
        on_event: JobEventCallback | None = None,
        timeout: float | None = None,
    ) -> common_pb2.Result:
        """Keyframe preview of an edit (a prompt or an EditSpec); the images are files of the result."""
        request = keyframes_pb2.EditKeyframesRequest(inversion_digest=inversion_digest, edit=_as_edit(edit))
        return _run_job(self._keyframes.EditKeyframes, request, self._timeout(timeout), on_event)

    def propagate(
        self,
        inversion_digest: str,
        edit: common_pb2.EditSpec | str,
        on_event: JobEventCallback | None = None,
        timeout: float | None = None,
    ) -> common_pb2.Result:
        """Full TokenFlow edit of every frame; the video is the result's primary file."""
        request = propagation_pb2.PropagateRequest(inversion_digest=inversion_digest, edit=_as_edit(edit))
        return _run_job(self._propagation.Propagate, request, self._timeout(timeout), on_event)

    def cancel(self, stage: str, job_id: str, timeout: float | None = None) -> Any:
        """Cancel a job of `stage` ("inversion", "keyframes" or "propagation") for every caller.

        Returns the stage's cancel response (`cancelled`, `message`).
        """
        calls = {
            "inversion": (self._inversion, inversion_pb2.InversionCancelRequest),
            "keyframes": (self._keyframes, keyframes_pb2.KeyframesCancelRequest),
            "propagation": (self._propagation, propagation_pb2.PropagationCancelRequest),
        }
        if stage not in calls:
            raise ValueError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
        stub, request_type = calls[stage]
        with _translate_errors():
            return stub.Cancel(request_type(job_id=job_id), timeout=self._timeout(timeout))

    # -- Editor --------------------------------------------------------------------------------------------

    def edit(
        self,
        video: str | os.PathLike[str],
        edits: str | common_pb2.EditSpec | Iterable[str | common_pb2.EditSpec],
        decode: common_pb2.DecodeSpec | None = None,
        inversion: common_pb2.InversionSpec | None = None,
        keyframes_only: bool = False,
        on_event: EditorEventCallback | None = None,
        timeout: float | None = None,
    ) -> list[common_pb2.Result]:
        """Edit a video (a path to upload, or the digest of an uploaded one) under one or many edits.

        One inversion is shared by all edits. Returns one Result per edit, in the order given;
        `on_event` sees every EditResponse (edit_index -1 is the inversion).
        """
        video_digest = self._video_digest(video, timeout)
        specs = [_as_edit(e) for e in ([edits] if isinstance(edits, (str, common_pb2.EditSpec)) else edits)]
        if not specs:
            raise ValueError("give at least one prompt or EditSpec")
        request = editor_pb2.EditRequest(
            video_digest=video_digest,
            decode=decode,
            inversion=inversion,
            edits=specs,
            keyframes_only=keyframes_only,
        )
        results: dict[int, common_pb2.Result] = {}

        def on_message(event: editor_pb2.EditResponse) -> None:
            if on_event is not None:
                on_event(event)
            if event.edit_index >= 0 and event.WhichOneof("event") == "result":
                results[event.edit_index] = event.result

        _follow_stream(self._editor.Edit, lambda: request, self._timeout(timeout), on_message)
        missing = [i for i in range(len(specs)) if i not in results]
        if missing:
            raise ClientError(
                grpc.StatusCode.INTERNAL, f"the server ended the edit without results for edits {missing}"
            )
        return [results[i] for i in range(len(specs))]

    def _video_digest(self, video: str | os.PathLike[str], timeout: float | None) -> str:
        """A digest passes through; a path is uploaded first."""
        if isinstance(video, str) and is_digest(video) and not os.path.exists(video):
            return video
        return self.upload(video, timeout=timeout)

    # -- Operations (google.longrunning): any replica answers for any job of the fleet -------------------

    def get_operation(self, name: str, timeout: float | None = None) -> operations_proto_pb2.Operation:
        """The job's operation: `name` is ``operations/<digest>`` or the digest (Progress.job_id)."""
        request = operations_proto_pb2.GetOperationRequest(name=operation_name(name))
        with _translate_errors():
            return self._operations.GetOperation(request, timeout=self._timeout(timeout))

    def wait_operation(
        self, name: str, wait: float = 60.0, timeout: float | None = None
    ) -> operations_proto_pb2.Operation:
        """Block until the operation is done or `wait` seconds passed (the server caps it at 600 s);
        returns it either way (check `done`). Polling backends use this instead of holding a stream."""
        request = operations_proto_pb2.WaitOperationRequest(name=operation_name(name))
        request.timeout.FromNanoseconds(int(wait * 1e9))
        with _translate_errors():
            return self._operations.WaitOperation(request, timeout=timeout or wait + 30)

    def list_operations(
        self, filter: str = "", page_size: int = 0, timeout: float | None = None
    ) -> Iterator[operations_proto_pb2.Operation]:
        """Every operation the fleet knows (running, and finished within the last hour), page by page;
        `filter` is "", "done = true" or "done = false"."""
        token = ""
        while True:
            request = operations_proto_pb2.ListOperationsRequest(
                name="operations", filter=filter, page_size=page_size, page_token=token
            )
            with _translate_errors():
                response = self._operations.ListOperations(request, timeout=self._timeout(timeout))
            yield from response.operations
            token = response.next_page_token
            if not token:
                return

    def cancel_operation(self, name: str, timeout: float | None = None) -> None:
        """Cancel the job on whichever replica runs it (and every replica waiting for it)."""
        request = operations_proto_pb2.CancelOperationRequest(name=operation_name(name))
        with _translate_errors():
            self._operations.CancelOperation(request, timeout=self._timeout(timeout))

    # -- Health --------------------------------------------------------------------------------------------

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the whole server): "SERVING", "NOT_SERVING", ..."""
        with _translate_errors():
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout)
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ----------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """Turn grpc.RpcError into ClientError, keeping the status code and the server's message."""
    try:
        yield
    except grpc.RpcError as e:
        raise ClientError.from_rpc_error(e) from None


def _run_job(
    method: Callable[..., Any],
    request: Any,
    timeout: float | None,
    on_event: JobEventCallback | None,
) -> common_pb2.Result:
    """Call a stage's streaming job method; feed events to `on_event`; return the final Result."""
    result: common_pb2.Result | None = None

    def on_message(event: Any) -> None:
        nonlocal result
        if on_event is not None:
            on_event(event)
        if event.WhichOneof("event") == "result":
            result = event.result

    _follow_stream(method, lambda: request, timeout, on_message)
    if result is None:
        raise ClientError(grpc.StatusCode.INTERNAL, "the job stream ended without a result")
    return result


def _follow_stream(
    method: Callable[..., Any],
    request_for: Callable[[], Any],
    timeout: float | None,
    on_message: Callable[[Any], None],
) -> None:
    """Stream a call's messages to `on_message`, sending it again when the stream is cut.

    Why: a job's stream outlives connections. A server closes every connection after its
    ``--max-connection-age-seconds`` plus a grace, a load balancer or a replica's restart drops it, and
    gRPC's own retries (clients/channels.py) stop once a stream is under way. The job itself goes on: a
    job's id is the content address of its result, so the same request re-attaches to the running job
    (or returns its stored result) as long as it comes back within the server's job grace
    (``--job-grace-seconds``, 120 s by default). A download is content-addressed too, so it goes on
    from the bytes it has (``DownloadRequest.offset``). So on UNAVAILABLE the request `request_for()`
    builds (called before every attempt) is sent again, after the channel's backoff, at most
    `REATTACH_ATTEMPTS` times in a row without a message in between; the caller's deadline bounds it
    all. Any other status, or an exception of `on_message`, ends the call (cancelling it, so the server
    can drop a job nobody waits for).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    failures = 0
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        call = method(request_for(), timeout=remaining)
        received = False
        try:
            for message in call:
                received = True
                on_message(message)
            return
        except grpc.RpcError as e:
            error = ClientError.from_rpc_error(e)
            failures = 0 if received else failures
            backoff = max(
                error.retry_delay or 0.0,
                min(
                    RETRY.max_backoff_seconds,
                    RETRY.initial_backoff_seconds * RETRY.backoff_multiplier**failures,
                ),
            )
            left = None if deadline is None else deadline - time.monotonic()
            if (
                error.code != grpc.StatusCode.UNAVAILABLE
                or error.reason not in _REATTACH_REASONS
                or failures >= REATTACH_ATTEMPTS
                or (left is not None and left <= backoff)
            ):
                raise error from None
            failures += 1
            log.warning(
                "the stream was cut (%s); re-attaching in %.1f s (attempt %d of %d)",
                error.message or "unavailable", backoff, failures, REATTACH_ATTEMPTS,
            )  # fmt: skip
            time.sleep(backoff)
        finally:
            call.cancel()  # no-op when the stream has ended; stops the server's job otherwise


def operation_name(name_or_digest: str) -> str:
    """``operations/<digest>`` for a digest (a job id), or the name unchanged."""
    return name_or_digest if name_or_digest.startswith("operations/") else f"operations/{name_or_digest}"


def operation_result(op: operations_proto_pb2.Operation) -> common_pb2.Result | None:
    """The Result of a done, successful operation; None while it runs. Raises ClientError if it failed."""
    if not op.done:
        return None
    if op.HasField("error"):
        code = next((c for c in grpc.StatusCode if c.value[0] == op.error.code), grpc.StatusCode.UNKNOWN)
        raise ClientError(code, op.error.message)
    result = common_pb2.Result()
    op.response.Unpack(result)
    return result


def operation_metadata(op: operations_proto_pb2.Operation) -> _operations_pb2.OperationMetadata:
    """The job's stage, latest progress, holder and attempt."""
    metadata = _operations_pb2.OperationMetadata()
    op.metadata.Unpack(metadata)
    return metadata


def _as_edit(edit: str | common_pb2.EditSpec) -> common_pb2.EditSpec:
    if isinstance(edit, common_pb2.EditSpec):
        return edit
    if isinstance(edit, str):
        return edit_spec(edit)
    raise TypeError(f"an edit is a prompt (str) or an EditSpec message, not {type(edit).__name__}")


def _file_sha256(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _create_part_file(dest: Path) -> tuple[int, Path]:
    """A new hidden temporary file beside `dest`, with the mode a normal new file gets (0666 & ~umask).

    Not tempfile.mkstemp: its 0600 would carry over to the downloaded file when it is renamed into place.
    """
    for _ in range(100):
        path = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {dest}")


def _safe_filename(name: str) -> str:
    """A server-suggested name reduced to a plain file name (no directories, no hidden files)."""
    base = os.path.basename(name.replace("\\", "/")).strip().lstrip(".")
    return base or "download.bin"
