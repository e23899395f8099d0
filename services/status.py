"""One place that turns exceptions into gRPC statuses, so every servicer answers errors the same way.

Library errors carry messages written for people (what was wrong and what to do); those pass through.
Anything unexpected becomes INTERNAL with a generic message and an error id; the traceback goes to the
server log under the same id, never to the client.
"""

from __future__ import annotations

import logging
import uuid
from typing import NoReturn

import grpc

from services.jobs import QueueFull, ShuttingDown
from services.store import ArtifactNotFound
from tokenflow.errors import Cancelled, ModelError, SpecError, TooLargeError, VideoError

log = logging.getLogger(__name__)

# Checked in order: the first matching class decides.
_MAPPING: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica"),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "the job queue is full; retry later"),
    (TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED, "the input exceeds a size limit"),
    (ArtifactNotFound, grpc.StatusCode.NOT_FOUND, "artifact not found"),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT, "invalid argument"),
    (VideoError, grpc.StatusCode.INVALID_ARGUMENT, "the input is not a readable video"),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION, "the model is missing or unusable"),
    (Cancelled, grpc.StatusCode.CANCELLED, "the job was cancelled"),
)


def _known(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    for cls, code, default in _MAPPING:
        if isinstance(exc, cls):
            # KeyError's str() adds quotes; use the argument itself when there is one.
            message = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
            return code, message or default
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        # An error from another stage we called (the Editor): our own servers' statuses pass through.
        code = exc.code()
        if isinstance(code, grpc.StatusCode):
            details = exc.details() if callable(getattr(exc, "details", None)) else ""
            return code, details or code.name.lower()
    return None


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message for the client) for an exception; logs unexpected ones with a traceback."""
    known = _known(exc)
    if known is not None:
        return known
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", error_id, exc, exc_info=(type(exc), exc, exc.__traceback__))
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server log has the details"


def outcome_label(code: grpc.StatusCode | None) -> str:
    """Metrics label of a status: its lower-case name ("ok", "not_found", ...)."""
    return "ok" if code is None else code.name.lower()


def outcome_for(exc: BaseException | None) -> str:
    """Metrics label of an exception (None = success) without logging; usable as JobManager's outcome_of."""
    if exc is None:
        return "ok"
    known = _known(exc)
    return outcome_label(known[0] if known is not None else grpc.StatusCode.INTERNAL)


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """Abort the RPC with the status for `exc` (raises, as `context.abort` does)."""
    code, message = grpc_status_for(exc)
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers and fake contexts
