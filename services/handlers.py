"""Re-wrapping a gRPC method handler: the one place that knows grpc's four kinds of handler.

Every server interceptor here (errors, metrics, the concurrency limit, auth) takes the handler
`continuation` returned, wraps its behaviour and builds a handler of the same kind around it with
the same (de)serialisers. grpc spells that as four attributes and four constructors; each
interceptor spelling it again was four copies of one decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behaviour = Callable[..., Any]
Wrap = Callable[[Behaviour], Behaviour]


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``); ("unknown", ...) if it is not one."""
    parts = full_method.lstrip("/").split("/", 1)
    if len(parts) != 2:
        return "unknown", full_method or "unknown"
    return parts[0], parts[1]


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    """The function grpc calls for `handler`, whichever of the four kinds it is."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream
    if handler.request_streaming:
        return handler.stream_unary
    if handler.response_streaming:
        return handler.unary_stream
    return handler.unary_unary


def rewrapped(
    handler: grpc.RpcMethodHandler,
    behaviour: Behaviour,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind running `behaviour`, with its serialisers (or `request_deserializer`)."""
    kwargs: dict[str, Any] = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


def wrapped(
    handler: grpc.RpcMethodHandler,
    unary: Wrap,
    streaming: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `streaming` if it streams responses, else by `unary`."""
    behaviour = behaviour_of(handler)
    wrap = streaming if handler.response_streaming else unary
    return rewrapped(handler, wrap(behaviour), request_deserializer)
