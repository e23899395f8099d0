"""Per-server limits on what callers can hold: concurrent RPCs, and how long an upload may stall.

Every streaming RPC holds one handler thread of the gRPC server for as long as it lasts (a progress
stream for minutes, an upload for as long as its client sends). Without a bound, a few dozen silent
uploads or callers attached to one job take every handler thread and the health checks time out,
so the orchestrator restarts a pod that was doing its work. Two limits keep threads for health:

* `ConcurrencyLimiter`: at most ``max_concurrent_rpcs`` RPCs of our own services (tokenflow.v1.*
  except ServerInfo, and google.longrunning.Operations) run at once; past it a call is refused at once
  with RESOURCE_EXHAUSTED (``SERVER_BUSY``, a RetryInfo, and a QuotaFailure naming the limit).
  grpc.health.v1, reflection and ServerInfo are never counted, so the threads left over always
  answer them.
* `IdleWatchdog`: an upload stream that sends nothing for ``upload_idle_seconds`` gets
  RESOURCE_EXHAUSTED (``UPLOAD_STALLED``) and its handler thread back. One thread watches every
  stream. The status is sent first, then the call is cancelled to wake the blocked handler; a Python
  client whose request generator is itself blocked sees that as CANCELLED (grpc's client reports
  the server's status only once the request stream has ended).

Both errors carry `limit_name` and `limit` like the library's TooLargeError, so services.errors names
the limit in the details.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from services.handlers import split_method, wrapped

log = logging.getLogger(__name__)

COUNTED_PREFIXES = ("tokenflow.v1.", "google.longrunning.")
"""Our services, and the Operations service (WaitOperation blocks a handler thread for long)."""
EXEMPT_SERVICES = frozenset({"tokenflow.v1.ServerInfo"})
"""Ours, but cheap and what an operator asks when the server is busy: never refused."""
HEALTH_RESERVE = 8
"""Handler threads kept free for health, reflection, ServerInfo and refusals (the default limit is
max_workers minus this)."""
DEFAULT_UPLOAD_IDLE_SECONDS = 60.0
"""Default of ``--upload-idle-seconds``: far longer than any chunk takes on a live connection."""
_CANCEL_AFTER = 0.2
"""Seconds between sending an idle upload's status and cancelling its call (so the status goes out)."""


class ServerBusy(Exception):
    """Too many RPCs in flight on this server (RESOURCE_EXHAUSTED, retryable)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this server is handling its limit of {limit} concurrent calls (max_concurrent_rpcs); "
            "retry shortly or on another replica"
        )
        self.limit_name = "max_concurrent_rpcs"
        self.limit = limit


class UploadStalled(Exception):
    """An upload stream sent nothing for too long (RESOURCE_EXHAUSTED, retryable)."""

    def __init__(self, limit: float) -> None:
        super().__init__(
            f"the upload sent nothing for {limit:g} s (upload_idle_seconds) and was closed; nothing was "
            "stored: upload again"
        )
        self.limit_name = "upload_idle_seconds"
        self.limit = limit


class ConcurrencyLimiter(grpc.ServerInterceptor):
    """Refuses our RPCs beyond `limit` in flight (see the module docstring).

    Install it after services.errors.ErrorInterceptor (innermost), so a refusal becomes a status
    with details like any other error.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {limit}")
        self.limit = int(limit)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.refused = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _acquire(self) -> None:
        with self._lock:
            if self._in_flight >= self.limit:
                self.refused += 1
                raise ServerBusy(self.limit)
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service, _ = split_method(handler_call_details.method)
        if handler is None or not service.startswith(COUNTED_PREFIXES) or service in EXEMPT_SERVICES:
            return handler
        return wrapped(handler, self._unary, self._streaming)

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            self._acquire()
            try:
                return behavior(request, context)
            finally:
                self._release()

        return wrapper

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._acquire()
            try:
                responses = behavior(request, context)
                if responses is not None:
                    yield from responses
            finally:
                self._release()

        return wrapper


class _Watch:
    __slots__ = ("context", "deadline", "fired", "idle")

    def __init__(self, context: grpc.ServicerContext, idle: float) -> None:
        self.context = context
        self.idle = idle
        self.deadline = time.monotonic() + idle
        self.fired = False


class IdleWatchdog:
    """One thread that closes upload streams idle for longer than their limit (module docstring)."""

    def __init__(self, tick: float = 0.25) -> None:
        self._tick = tick
        self._lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def guard(self, requests: Iterable[Any], context: grpc.ServicerContext, idle: float) -> Iterator[Any]:
        """`requests`, closed with UploadStalled if no message arrives for `idle` seconds."""
        watch = _Watch(context, idle)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upload-idle-watchdog", daemon=True)
                self._thread.start()
        try:
            iterator = iter(requests)
            while True:
                try:
                    request = next(iterator)
                except StopIteration:
                    return
                except grpc.RpcError:
                    if watch.fired:
                        raise UploadStalled(idle) from None
                    raise
                if watch.fired:
                    raise UploadStalled(idle)
                watch.deadline = time.monotonic() + idle
                yield request
        finally:
            with self._lock:
                self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                expired = [w for w in self._watches if not w.fired and w.deadline <= now]
                for w in expired:
                    w.fired = True
            for w in expired:
                threading.Thread(target=self._close, args=(w,), name="upload-idle-close", daemon=True).start()

    def _close(self, watch: _Watch) -> None:
        from grpc_status import rpc_status

        from services.errors import status_for  # services.errors imports this module

        self.fired += 1
        log.warning("closing an upload idle for %.0f s (upload_idle_seconds)", watch.idle)
        try:
            watch.context.abort_with_status(rpc_status.to_status(status_for(UploadStalled(watch.idle))))
        except Exception:  # noqa: BLE001 - abort always raises; the status has been sent
            pass
        time.sleep(_CANCEL_AFTER)
        watch.context.cancel()  # wakes the handler blocked on the next message


WATCHDOG = IdleWatchdog()
"""The process's watchdog (its thread starts with the first guarded stream)."""
