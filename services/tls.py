"""TLS for a server's port and for the Editor's channels to the stages, from the config's PEM files.

Server side: ``--tls-cert``/``--tls-key`` make every port of the server speak TLS only (there is no
plaintext port beside it); ``--tls-client-ca`` also requires each caller to present a certificate that
CA signed (mutual TLS).

The Editor's channels to the stages (its client side) use TLS when ``--internal-tls-ca`` is given, or
when the server itself serves TLS. Unset files default to the server's own, which covers the usual
setups with no extra flag:

- one self-signed certificate, embedded (``--services all``: the Editor calls its own port): the CA is
  the certificate itself (``--tls-cert``);
- one private CA for servers and clients, with mutual TLS: the CA is ``--tls-client-ca``, and the
  Editor presents the server's own certificate and key as its client certificate (issue it for both
  server and client authentication, or without an extended key usage);
- anything else (a public CA, a separate CA per tier): ``--internal-tls-ca`` (and
  ``--internal-tls-cert``/``--internal-tls-key`` for the Editor's client certificate).

The stage addresses must match a name in the stages' certificates (a DNS name or an IP address in its
subjectAltName), as for any TLS client.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from clients.channels import channel_credentials
from services.config import ServerConfig


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {flag} {str(path)!r}: {e.strerror or e}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials; None when it serves plaintext (no --tls-cert)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    pair = (_read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert"))
    client_ca = _read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def internal_channel_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    """The Editor's credentials towards the stages (module docstring); None = plaintext."""
    ca = config.internal_tls_ca
    if ca is None and config.tls_cert is not None:
        ca = config.tls_client_ca or config.tls_cert
    cert, key = config.internal_tls_cert, config.internal_tls_key
    if cert is None:
        cert, key = config.tls_cert, config.tls_key
    if ca is None and config.internal_tls_cert is None:
        return None
    return channel_credentials(ca, cert, key)
