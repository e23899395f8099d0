"""Channels from the Editor to the stages, and the servers' connection settings.

The channel policy itself (round robin over every address of a target, retries of UNAVAILABLE,
wait-for-ready with a bound, the ``host1:port,host2:port`` shorthand) is declared once, in
clients/channels.py, and shared with the client library; this module adds what only servers need:

- stage channels check each replica's health for the stage's own service name, so a replica that is
  loading its model, failed to load it or drains gets no new calls;
- `backend_count` says how many replicas a target names (the Editor's default edit parallelism);
- `server_options` makes servers close connections after `max_connection_age` (plus a grace for calls
  in flight), so long-lived clients re-resolve DNS and new pods receive traffic.
"""

from __future__ import annotations

import socket
from typing import Any

import grpc

from clients.channels import make_channel, normalize_target, target_addresses, unary_methods_of

STAGE_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Results and progress events are small; 16 MiB is generous without being unbounded.
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    # Notice a dead stage during long, quiet jobs (e.g. while queued). Five minutes matches a gRPC
    # server's default minimum accepted ping interval, so pings never earn a GOAWAY (too_many_pings).
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


def stage_channel(
    target: str,
    service_name: str,
    file_descriptor: Any,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to the replicas of one stage at `target`, balancing over the SERVING ones.

    `file_descriptor` is the stage's generated ``*_pb2.DESCRIPTOR`` (its unary methods, e.g. Cancel, get
    wait-for-ready and the default deadline). `credentials` for TLS (services/tls.py), `token` the
    Editor's bearer token (services/auth.py).
    """
    services, unary = unary_methods_of([file_descriptor])
    return make_channel(
        target,
        STAGE_CHANNEL_OPTIONS,
        services,
        unary,
        health_service=service_name,
        credentials=credentials,
        token=token,
    )


def backend_count(target: str) -> int:
    """How many replicas `target` names right now: the list's length for static targets, the number of
    addresses DNS returns for a name (a headless Service: one per ready pod), 1 when unknown."""
    listed = target_addresses(target)
    if listed is not None:
        return max(1, len(listed))
    normalized = normalize_target(target)
    if normalized.startswith(("unix:", "unix-abstract:", "vsock:")):
        return 1
    name = normalized.removeprefix("dns:")
    if name.startswith("//"):  # dns://authority/name:port
        name = name[2:].split("/", 1)[-1]
    host, _, port = name.rpartition(":")
    if not host:
        host, port = name, "443"
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port) if port.isdigit() else None, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError):
        return 1
    return max(1, len({info[4][0] for info in infos}))


def server_options(
    max_connection_age_seconds: float | None, max_connection_age_grace_seconds: float | None
) -> list[tuple[str, Any]]:
    """gRPC server options that make clients reconnect (and re-resolve) every `max_connection_age`.

    After the age the server sends GOAWAY; calls in flight get the grace to finish, then the connection
    is closed. A stage job's stream can outlive the grace: the Editor then re-attaches to the same job
    (same content address) on whichever replica it reaches, so long jobs survive a reconnect.
    """
    options: list[tuple[str, Any]] = []
    if max_connection_age_seconds:
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)))
        if max_connection_age_grace_seconds is not None:
            options.append(("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_seconds * 1000)))
    return options
