"""services.handlers: a re-wrapped handler keeps its kind and serialisers, whichever of the four it is."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from services.handlers import behaviour_of, split_method, wrapped

KINDS = {
    "unary_unary": (False, False, grpc.unary_unary_rpc_method_handler),
    "unary_stream": (False, True, grpc.unary_stream_rpc_method_handler),
    "stream_unary": (True, False, grpc.stream_unary_rpc_method_handler),
    "stream_stream": (True, True, grpc.stream_stream_rpc_method_handler),
}


def _serialise(x: Any) -> bytes:
    return b"out"


def _deserialise(b: bytes) -> str:
    return "in"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wrapped_keeps_the_kind_and_wraps_by_response_streaming(kind: str) -> None:
    request_streaming, response_streaming, make = KINDS[kind]

    def behaviour(request: Any, context: Any) -> str:
        return "called"

    handler = make(behaviour, request_deserializer=_deserialise, response_serializer=_serialise)
    assert behaviour_of(handler) is behaviour
    used: list[str] = []

    def by(name: str) -> Any:
        def wrap(inner: Any) -> Any:
            used.append(name)
            return lambda request, context: ("wrapped", inner(request, context))

        return wrap

    out = wrapped(handler, by("unary"), by("streaming"))
    assert (out.request_streaming, out.response_streaming) == (request_streaming, response_streaming)
    assert used == ["streaming" if response_streaming else "unary"]
    assert getattr(out, kind)(None, None) == ("wrapped", "called")
    assert out.request_deserializer is _deserialise and out.response_serializer is _serialise
    other = wrapped(handler, by("unary"), by("streaming"), request_deserializer=str)
    assert other.request_deserializer is str and other.response_serializer is _serialise


def test_split_method() -> None:
    assert split_method("/tokenflow.v1.Editor/Edit") == ("tokenflow.v1.Editor", "Edit")
    assert split_method("nonsense") == ("unknown", "nonsense")
    assert split_method("") == ("unknown", "unknown")
