"""Errors as `google.rpc.Status` with details: one table, one interceptor, for every RPC.

Each exception class the services can raise is declared once in `ERRORS` with its gRPC status code, a
stable machine-readable reason (the `google.rpc.ErrorInfo.reason` callers branch on) and whether a retry
can succeed (then a `google.rpc.RetryInfo` says after how long). Spec errors also carry a
`google.rpc.BadRequest` field violation naming the field ("edit.guidance_scale"); size limits name the
limit in the ErrorInfo metadata. So "too large" (INPUT_TOO_LARGE, no RetryInfo) and "queue full"
(QUEUE_FULL, RetryInfo) share RESOURCE_EXHAUSTED but differ in their details, not only their text.

Servicers just raise. `ErrorInterceptor` catches what a handler raises -- for streaming handlers also
while the response stream is iterated -- turns it into the status, and records the request metric
(`tokenflow_requests_total` / `_seconds`) for every RPC, Artifacts included. Library messages are written
for people and pass through; anything unexpected becomes INTERNAL with a generic message and an error id,
the traceback going to the server log under that id, never to the client.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.handlers import split_method, wrapped
from services.jobs import QueueFull, ShuttingDown
from services.limits import ServerBusy, UploadStalled
from services.metrics import Metrics, outcome_of
from services.store import (
    ArtifactInUse,
    ArtifactNotFound,
    CorruptArtifact,
    StoreFull,
    TierUnavailable,
    WrongArtifactKind,
)
from services.store.composite import FULL_MESSAGE
from services.store.model import is_disk_full
from tokenflow.errors import Cancelled, ModelError, SpecError, TooLargeError, VideoError

log = logging.getLogger(__name__)

DOMAIN = "tokenflow.v1"
"""ErrorInfo.domain of every error the services produce."""


class StageUnavailable(Exception):
    """The Editor could not reach a stage (its address is never shown to callers)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the {stage} stage is unreachable; retry later")
        self.stage = stage


class DeadlineExceeded(Exception):
    """The caller's deadline passed before the work could be handed on."""


class DataLoss(Exception):
    """Bytes changed under a transfer after they were verified: the partial result must be discarded."""


class MalformedRequest(SpecError):
    """The request bytes do not parse as the RPC's request message (INVALID_ARGUMENT, not INTERNAL)."""


class _Unparseable:
    """What the request deserializer hands on for bytes that do not parse (the handler raises)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def exception(self) -> MalformedRequest:
        return MalformedRequest(f"the request could not be parsed: {type(self.error).__name__}: {self.error}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's
            return _Unparseable(e)

    return deserialize


def _parsed(request: Any) -> Any:
    """The request, or its stream with every message checked; MalformedRequest for unparseable bytes."""
    if isinstance(request, _Unparseable):
        raise request.exception()
    if hasattr(request, "__next__"):
        return _checked_stream(request)
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Unparseable):
            raise request.exception()
        yield request


class Unauthenticated(Exception):
    """No valid credential on a call that needs one (services.auth): missing, malformed or unknown token.

    `problem` ("missing", "malformed", "invalid") goes to the ErrorInfo metadata; the token never does.
    """

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class PermissionDenied(Exception):
    """An authenticated principal may not do this (services.auth); `action` names what was refused."""

    def __init__(self, message: str, action: str) -> None:
        super().__init__(message)
        self.action = action


class RelayedStatus(Exception):
    """A status another of our servers sent (the Editor relays a stage's), passed on with its details."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


@dataclass(frozen=True)
class ErrorClass:
    """How one exception class is answered."""

    exception: type[BaseException]
    code: grpc.StatusCode
    reason: str
    retry_after: float | None = None
    """Seconds after which a retry may succeed (sent as RetryInfo); None = do not retry as is."""
    default_message: str = ""


# Checked in order: the first matching class decides (subclasses before their bases).
_C = grpc.StatusCode
ERRORS: tuple[ErrorClass, ...] = (
    ErrorClass(Unauthenticated, _C.UNAUTHENTICATED, "UNAUTHENTICATED", None, "a valid token is required"),
    ErrorClass(PermissionDenied, _C.PERMISSION_DENIED, "PERMISSION_DENIED", None, "not allowed"),
    ErrorClass(ShuttingDown, _C.UNAVAILABLE, "SHUTTING_DOWN", 1.0, "the server is shutting down"),
    ErrorClass(StageUnavailable, _C.UNAVAILABLE, "STAGE_UNAVAILABLE", 5.0, "a stage is unreachable"),
    ErrorClass(TierUnavailable, _C.UNAVAILABLE, "STORE_UNAVAILABLE", 5.0, "the store is unreachable"),
    ErrorClass(StoreFull, _C.RESOURCE_EXHAUSTED, "STORE_FULL", 30.0, "the store is out of disk space"),
    ErrorClass(ServerBusy, _C.RESOURCE_EXHAUSTED, "SERVER_BUSY", 1.0, "too many calls in flight"),
    ErrorClass(UploadStalled, _C.RESOURCE_EXHAUSTED, "UPLOAD_STALLED", 1.0, "the upload stalled"),
    ErrorClass(MalformedRequest, _C.INVALID_ARGUMENT, "MALFORMED_REQUEST", None, "unparseable request"),
    ErrorClass(QueueFull, _C.RESOURCE_EXHAUSTED, "QUEUE_FULL", 5.0, "the job queue is full"),
    ErrorClass(TooLargeError, _C.RESOURCE_EXHAUSTED, "INPUT_TOO_LARGE", None, "the input is too large"),
    ErrorClass(ArtifactInUse, _C.FAILED_PRECONDITION, "ARTIFACT_IN_USE", 10.0, "the artifact is in use"),
    # A corrupt artifact was found and removed: retrying the call that produces it (same digest) succeeds.
    ErrorClass(CorruptArtifact, _C.ABORTED, "ARTIFACT_CORRUPT", 1.0, "the artifact was corrupt"),
    ErrorClass(ArtifactNotFound, _C.NOT_FOUND, "ARTIFACT_NOT_FOUND", None, "artifact not found"),
    ErrorClass(WrongArtifactKind, _C.INVALID_ARGUMENT, "WRONG_ARTIFACT_KIND", None, "wrong artifact kind"),
    ErrorClass(SpecError, _C.INVALID_ARGUMENT, "INVALID_SPEC", None, "invalid argument"),
    ErrorClass(VideoError, _C.INVALID_ARGUMENT, "INVALID_VIDEO", None, "not a readable video"),
    ErrorClass(ModelError, _C.FAILED_PRECONDITION, "MODEL_UNAVAILABLE", None, "the model is unusable"),
    ErrorClass(Cancelled, _C.CANCELLED, "CANCELLED", None, "the job was cancelled"),
    ErrorClass(DeadlineExceeded, _C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None, "the deadline passed"),
    ErrorClass(DataLoss, _C.DATA_LOSS, "DATA_LOSS", 1.0, "the data changed during the transfer"),
)
INTERNAL_REASON = "INTERNAL"
IMPLEMENTED_STANDARD_SERVICES = frozenset({"google.longrunning.Operations"})
"""Standard services whose handlers are ours (services/operations.py): errors and metrics as for ours."""

_ADDRESS = re.compile(
    r"(?:ipv4:|ipv6:|dns:(?://[^/\s]*/)?|unix:|unix-abstract:)?"
    r"(?:\[[0-9a-fA-F:.%]+\]|\d{1,3}(?:\.\d{1,3}){3}|localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
    r":\d{1,5}\b"
)


def scrub_addresses(message: str, replacement: str) -> str:
    """`message` with every network address (ipv4:127.0.0.1:50799, [::1]:5, host.example:443) replaced."""
    return _ADDRESS.sub(replacement, message)


def error_class(exc: BaseException) -> ErrorClass | None:
    for entry in ERRORS:
        if isinstance(exc, entry.exception):
            return entry
    return None


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _message(exc: BaseException, default: str) -> str:
    # KeyError's str() adds quotes; use the argument itself when there is one.
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    return text or default


def _metadata(exc: BaseException) -> dict[str, str]:
    """The structured data a library error carries (the limit or field concerned) as ErrorInfo metadata."""
    out: dict[str, str] = {}
    for attribute in ("field", "limit_name", "limit", "stage", "problem", "action"):
        value = getattr(exc, attribute, None)
        if value is not None:
            out[attribute] = str(value)
    return out


def status_for(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status (code, message, details) for an exception; logs unexpected ones."""
    if isinstance(exc, RelayedStatus):
        return exc.status
    if is_disk_full(exc) and not isinstance(exc, StoreFull):  # a job's scratch write: never name its path
        log.error("disk full: %s", exc)
        exc = StoreFull(FULL_MESSAGE)
    entry = error_class(exc)
    if entry is None:
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s: %r", error_id, exc, exc_info=(type(exc), exc, exc.__traceback__))
        return status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error (id {error_id}); the server log has the details",
            details=[
                _pack(
                    error_details_pb2.ErrorInfo(
                        reason=INTERNAL_REASON, domain=DOMAIN, metadata={"error_id": error_id}
                    )
                )
            ],
        )
    message = _message(exc, entry.default_message)
    metadata = _metadata(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=entry.reason, domain=DOMAIN, metadata=metadata))]
    if entry.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(entry.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if "limit_name" in metadata and entry.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        limit = f"{metadata['limit_name']} = {metadata.get('limit', '?')}"
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=metadata["limit_name"], description=f"{limit}: {message}"
        )
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    if "field" in metadata and entry.code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=metadata["field"], description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=entry.code.value[0], message=message, details=details)


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN


def outcome_for(exc: BaseException | None) -> str:
    """Metrics label of an exception (None = success) without logging; JobManager's `outcome_of`."""
    if exc is None:
        return "ok"
    if isinstance(exc, RelayedStatus):
        return outcome_of(code_of(exc.status))
    entry = error_class(exc)
    return outcome_of(entry.code if entry is not None else grpc.StatusCode.INTERNAL)


def reason_of(status: status_pb2.Status) -> str | None:
    """The ErrorInfo reason of a status, if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def relayed(error: grpc.RpcError, stage: str) -> Exception:
    """What the Editor raises for a stage call that failed: the stage's status with its details, or
    StageUnavailable when the stage could not be reached; no peer address survives in the message."""
    placeholder = f"the {stage} stage"
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    if status is not None:
        scrubbed = status_pb2.Status()
        scrubbed.CopyFrom(status)
        scrubbed.message = scrub_addresses(status.message, placeholder)
        return RelayedStatus(scrubbed)
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return StageUnavailable(stage)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{placeholder} did not finish within the caller's deadline")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"the call to {placeholder} was cancelled")
    message = scrub_addresses(details or code.name.lower(), placeholder)
    return RelayedStatus(status_pb2.Status(code=code.value[0], message=message))


# ----------------------------------------------------------------------------------------------------------
# the interceptor


def _service_label(service: str) -> str:
    """`tokenflow.v1.Inversion` -> "inversion" (the `service` label of the request metrics)."""
    return service.rsplit(".", 1)[-1].lower()


def _gone_outcome(context: grpc.ServicerContext) -> str:
    """Why a caller left before the end: its deadline passed, or it cancelled / disconnected."""
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - best effort only
        remaining = None
    return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"


def _aborted_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code a handler already set (it called context.abort itself), if any."""
    code_fn = getattr(context, "code", None)
    code = code_fn() if callable(code_fn) else None
    return code if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK else None


class _Request:
    """One RPC's outcome and timing for the request metrics, recorded once."""

    def __init__(self, metrics: Metrics | None, service: str, method: str) -> None:
        self._metrics = metrics
        self._labels = (service, method)
        self._start = time.perf_counter()
        self._done = False

    def finish(self, outcome: str) -> None:
        if self._done or self._metrics is None:
            return
        self._done = True
        self._metrics.observe_request(*self._labels, outcome, time.perf_counter() - self._start)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to google.rpc statuses and records the request metrics, for every RPC.

    Only handlers of our own services (tokenflow.v1.*, and the standard services we implement:
    `IMPLEMENTED_STANDARD_SERVICES`) are wrapped: grpc's health and reflection handlers keep their own
    behaviour (and their non-blocking streaming modes).
    """

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        if not service.startswith(DOMAIN + ".") and service not in IMPLEMENTED_STANDARD_SERVICES:
            return handler
        label = _service_label(service)
        return wrapped(
            handler,
            lambda behaviour: self._unary(behaviour, label, method),
            lambda behaviour: self._streaming(behaviour, label, method),
            request_deserializer=_tolerant(handler.request_deserializer),
        )

    def _unary(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Request(self._metrics, service, method)
            try:
                response = behavior(_parsed(request), context)
            except Exception as e:  # noqa: BLE001 - every failure becomes a status
                _abort(context, e, call)
            aborted = _aborted_code(context)
            call.finish(outcome_of(aborted) if aborted else "ok")
            return response

        return wrapper

    def _streaming(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Request(self._metrics, service, method)
            try:
                responses = behavior(_parsed(request), context)
                if responses is not None:
                    yield from responses
            except GeneratorExit:  # grpc dropped the stream: the caller is gone
                call.finish(_gone_outcome(context))
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a status
                _abort(context, e, call)
            aborted = _aborted_code(context)
            if aborted is not None:
                call.finish(outcome_of(aborted))
            else:
                call.finish("ok" if context.is_active() else _gone_outcome(context))

        return wrapper


def _abort(context: grpc.ServicerContext, exc: Exception, call: _Request) -> None:
    """End the RPC with the status of `exc` (raises, as context.abort does)."""
    aborted = _aborted_code(context)
    if aborted is not None:  # the handler aborted itself: its status stands
        call.finish(outcome_of(aborted))
        raise exc
    status = status_for(exc)
    code = code_of(status)
    if not context.is_active() and code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        call.finish(_gone_outcome(context))
    else:
        call.finish(outcome_of(code))
    context.abort_with_status(rpc_status.to_status(status))
