"""Python client of the TokenFlow gRPC services.

Depends only on grpc and the generated ``tokenflow_pb`` code, so it can be installed next to any caller
without torch or the model code (`pip install ./clients` installs just these, see clients/pyproject.toml).
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

__version__ = "0.1.0"
"""The client's version: the one declaration, read by the build (clients/pyproject.toml) and `--version`."""

__all__ = [
    "__version__",
    "CHUNK_SIZE",
    "STAGES",
    "ClientError",
    "TokenFlowClient",
    "decode_spec",
    "edit_spec",
    "inversion_spec",
]
