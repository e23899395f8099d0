"""Server reflection under both names clients use: `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection ships only the v1alpha service. The v1 protocol is the same proto under a new package
name (same messages, same field numbers), so v1 is served by the same servicer through a generic handler
registered under the v1 name, and the v1 file descriptor (v1alpha's, renamed) is added to the descriptor
pool so reflection can describe itself under both names.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def _register_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool (v1alpha's file, renamed)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # already there (a newer grpcio-reflection, or an earlier call)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old = proto.package
    proto.name = _V1_FILE
    proto.package = V1_PACKAGE
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # proto2: assigning "" would set it
                f.type_name = f.type_name.replace(f".{old}.", f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{V1_PACKAGE}.")
    pool.Add(proto)


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (the reflection services are added)."""
    _register_v1_descriptor()
    names = (*service_names, *SERVICE_NAMES)
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),
            grpc.method_handlers_generic_handler(V1ALPHA_SERVICE_NAME, {"ServerReflectionInfo": handler}),
        )
    )
