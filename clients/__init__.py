"""Python client of the TokenFlow gRPC services.

Depends only on grpc and the generated ``tokenflow_pb`` code, so it can be installed next to any caller
without torch or the model code.
"""

from clients.client import (
    CHUNK_SIZE,
    STAGES,
    ClientError,
    TokenFlowClient,
    decode_spec,
    edit_spec,
    inversion_spec,
)

__all__ = [
    "CHUNK_SIZE",
    "STAGES",
    "ClientError",
    "TokenFlowClient",
    "decode_spec",
    "edit_spec",
    "inversion_spec",
]
