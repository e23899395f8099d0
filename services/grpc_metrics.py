"""Standard gRPC server metrics as a ``grpc.ServerInterceptor`` (sync ``grpc.server`` only).

Exports the go-grpc-prometheus / py-grpc-prometheus series so stock dashboards and
alerts work unchanged: ``grpc_server_started_total``, ``grpc_server_handled_total``
(with ``grpc_code``), ``grpc_server_handling_seconds``, ``grpc_server_msg_received_total``
and ``grpc_server_msg_sent_total``, labelled by ``grpc_type`` (unary, client_stream,
server_stream, bidi_stream), ``grpc_service`` and ``grpc_method``. The metric objects
live on ``Metrics`` (one registration per registry).

The final status of an RPC is, in order: the code the handler set or aborted with
(``context.code()``); UNKNOWN if it raised; CANCELLED or DEADLINE_EXCEEDED if the
client went away first; otherwise OK. Each RPC is counted as handled exactly once,
whichever of those paths fires first; a termination callback catches clients that
disappear while a stream handler is blocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.handlers import split_method, wrapped
from services.metrics import Metrics

__all__ = ["PrometheusServerInterceptor"]

_UNARY = "unary"
_CLIENT_STREAM = "client_stream"
_SERVER_STREAM = "server_stream"
_BIDI_STREAM = "bidi_stream"


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return _BIDI_STREAM
    if handler.request_streaming:
        return _CLIENT_STREAM
    if handler.response_streaming:
        return _SERVER_STREAM
    return _UNARY


def _context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code_fn = getattr(context, "code", None)
    code = code_fn() if callable(code_fn) else None
    return code if isinstance(code, grpc.StatusCode) else None


def _gone_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a client left: its deadline passed, or it cancelled."""
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - best effort only
        remaining = None
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _final_code(context: grpc.ServicerContext, raised: bool) -> grpc.StatusCode:
    """Status the server sends for an RPC whose handler just finished (see module docstring)."""
    code = _context_code(context)
    if code is not None:
        return code
    if raised:
        return grpc.StatusCode.UNKNOWN
    if not context.is_active():
        return _gone_code(context)
    return grpc.StatusCode.OK


class _Call:
    """Metrics of one RPC; ``finish`` records the outcome once, from whichever path sees it first."""

    __slots__ = ("_done", "_labels", "_lock", "_metrics", "_start")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._lock = threading.Lock()
        self._done = False
        self._start = time.perf_counter()
        metrics.grpc_server_started_total.labels(*labels).inc()

    def received(self) -> None:
        self._metrics.grpc_server_msg_received_total.labels(*self._labels).inc()

    def sent(self) -> None:
        self._metrics.grpc_server_msg_sent_total.labels(*self._labels).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        elapsed = time.perf_counter() - self._start
        self._metrics.grpc_server_handled_total.labels(*self._labels, code.name).inc()
        self._metrics.grpc_server_handling_seconds.labels(*self._labels).observe(elapsed)

    def on_termination(self, context: grpc.ServicerContext) -> Callable[[], None]:
        """Callback for ``context.add_callback``: if nothing recorded yet, the client left."""

        def callback() -> None:
            self.finish(_context_code(context) or _gone_code(context))

        return callback


class PrometheusServerInterceptor(grpc.ServerInterceptor):
    """Wraps every method handler to count RPCs, status codes, messages and latency.

    Usage: ``grpc.server(executor, interceptors=[PrometheusServerInterceptor(metrics)])``.
    Handlers that use grpc's experimental non-blocking streaming (``experimental_non_blocking``,
    e.g. the health service's Watch) keep that mode.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        service, method = split_method(handler_call_details.method)
        labels = (_rpc_type(handler), service, method)
        return wrapped(
            handler,
            lambda behaviour: self._unary(behaviour, labels),
            lambda behaviour: self._streaming(behaviour, labels),
        )

    def _begin(
        self, labels: tuple[str, str, str], request: Any, context: grpc.ServicerContext
    ) -> tuple[_Call, Any]:
        """Start counting an RPC; wraps a request stream so its messages count as they are read."""
        call = _Call(self._metrics, labels)
        context.add_callback(call.on_termination(context))
        if labels[0] in (_CLIENT_STREAM, _BIDI_STREAM):
            request = _count_requests(request, call)
        else:
            call.received()
        return call, request

    def _unary(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        """Wrapper for handlers with a single response (unary/unary, stream/unary)."""

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            call, request = self._begin(labels, request, context)
            try:
                response = behavior(request, context)
            except BaseException:
                call.finish(_final_code(context, raised=True))
                raise
            code = _final_code(context, raised=False)
            if response is not None and code == grpc.StatusCode.OK:
                call.sent()
            call.finish(code)
            return response

        return wrapper

    def _streaming(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        """Wrapper for handlers with a response stream (unary/stream, stream/stream)."""
        if getattr(behavior, "experimental_non_blocking", False):
            return self._non_blocking(behavior, labels)

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            call, request = self._begin(labels, request, context)
            try:
                responses = behavior(request, context)
            except BaseException:
                call.finish(_final_code(context, raised=True))
                raise
            if responses is None:
                call.finish(_final_code(context, raised=False))
                return None
            return _count_responses(responses, call, context)

        return wrapper

    def _non_blocking(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        """Wrapper keeping grpc's experimental callback-style streaming; ``None`` ends the stream."""

        def wrapper(
            request: Any, context: grpc.ServicerContext, send_response_callback: Callable[[Any], None]
        ) -> Any:
            call, request = self._begin(labels, request, context)

            def send(response: Any) -> None:
                if response is None:
                    call.finish(_final_code(context, raised=False))
                else:
                    call.sent()
                send_response_callback(response)

            try:
                return behavior(request, context, send)
            except BaseException:
                call.finish(_final_code(context, raised=True))
                raise

        wrapper.experimental_non_blocking = True  # type: ignore[attr-defined]
        pool = getattr(behavior, "experimental_thread_pool", None)
        if pool is not None:
            wrapper.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return wrapper


def _count_requests(requests: Iterator[Any], call: _Call) -> Iterator[Any]:
    """Pass a request stream through, counting each message as the handler reads it."""
    for request in requests:
        call.received()
        yield request


def _count_responses(responses: Any, call: _Call, context: grpc.ServicerContext) -> Iterator[Any]:
    """Pass a response stream through, counting messages and recording the final status."""
    try:
        for response in responses:
            call.sent()
            yield response
    except GeneratorExit:
        # grpc dropped the stream (client gone); stop the handler's generator promptly.
        call.finish(_context_code(context) or _gone_code(context))
        close = getattr(responses, "close", None)
        if callable(close):
            close()
        raise
    except BaseException:
        call.finish(_final_code(context, raised=True))
        raise
    call.finish(_final_code(context, raised=False))
