"""How every channel to a TokenFlow server is built: targets, load balancing, retries, wait-for-ready.

One policy for the client library and for the Editor's channels to the stages (services.channels builds
on this module), so the two cannot drift apart:

- **All addresses of a target, round robin.** gRPC's default policy, pick_first, sends every call of a
  channel to the first address that answers. A DNS name of a Kubernetes headless Service resolves to
  every ready pod, and `ipv4:`/`ipv6:` targets list several addresses; with ``round_robin`` every call
  goes to the next ready address. A plain comma list of IP literals, ``"10.0.0.1:50051,10.0.0.2:50051"``,
  is accepted as a shorthand and becomes ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (``ipv6:`` for
  ``[addr]:port`` items). Host names in a comma list are refused: gRPC resolves one name per channel,
  so several names would need several channels; use one DNS name with several records instead.
- **Health-aware balancing (optional).** With `health_service` set, the channel watches each backend's
  ``grpc.health.v1`` status for that service and round robin skips backends that are not SERVING (a
  replica still loading its model, or draining). Backends without a health service count as healthy.
- **Retries of UNAVAILABLE.** A call that fails with UNAVAILABLE before the server sent anything (a
  replica that is gone, refusing new jobs because it drains, or a connection that broke) is retried
  transparently, with exponential backoff, up to `RETRY.max_attempts` attempts; under round robin the
  retry goes to another replica. A retry budget (``retryThrottling``) stops retries from multiplying the
  load of a struggling fleet. Once a stream has delivered a message gRPC no longer retries it: the
  Editor's failover (services/editor.py) takes over there, and the client re-sends a job call whose
  stream was cut, which re-attaches to the running job, and a download from the bytes it has
  (clients/client.py, `REATTACH_ATTEMPTS`).
- **TLS and a bearer token (optional).** `channel_credentials` reads a CA bundle (and a client
  certificate and key for mutual TLS); `token` adds ``authorization: Bearer <token>`` to every call
  through a client interceptor, so it works on TLS and plaintext channels alike (gRPC's call credentials
  refuse plaintext). Health checks the channel makes by itself carry no token: servers never ask for
  one on ``grpc.health.v1``.
- **Wait-for-ready, bounded.** Unary calls wait for a ready backend instead of failing at once while a
  replica restarts, and carry a default deadline (`UNARY_TIMEOUT_SECONDS`) so the wait is bounded even
  when the caller set none; a caller's own timeout always wins when it is shorter. Streaming job calls
  run for minutes and get no default deadline here: the Editor bounds its wait for a ready stage itself,
  and a client sets its own timeout.

Only grpc and the standard library are imported here (the client installs without the server).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

__all__ = [
    "RETRY",
    "UNARY_TIMEOUT_SECONDS",
    "RetryPolicy",
    "BearerToken",
    "channel_credentials",
    "channel_options",
    "make_channel",
    "unary_methods_of",
    "normalize_target",
    "service_config",
    "target_addresses",
]

SCHEMES_WITH_LISTS = ("ipv4:", "ipv6:")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retryPolicy for UNAVAILABLE (https://github.com/grpc/proposal/blob/master/A6-client-retries.md)."""

    max_attempts: int = 5
    """Attempts in all, the first included (gRPC caps this at 5)."""
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE",)
    throttle_max_tokens: int = 10
    """Retry budget: retries stop while more than half of these tokens are spent by failures."""
    throttle_token_ratio: float = 0.1


RETRY = RetryPolicy()
UNARY_TIMEOUT_SECONDS = 60.0
"""Default deadline of unary calls (describe, list, cancel, server info), bounding wait-for-ready."""


def _duration(seconds: float) -> str:
    """Protobuf JSON Duration ("0.2s")."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(
    services: Iterable[str],
    unary_methods: Iterable[tuple[str, str]] = (),
    *,
    health_service: str | None = None,
    retry: RetryPolicy = RETRY,
    unary_timeout: float = UNARY_TIMEOUT_SECONDS,
) -> str:
    """The service config (JSON) of a channel calling `services` (full names, e.g. tokenflow.v1.Editor).

    Every method of `services` gets the retry policy; `unary_methods` ((service, method) pairs) also get
    wait-for-ready and the default deadline `unary_timeout`. `health_service` turns on client-side
    health checking against that service name ("" = the server as a whole).
    """
    retry_policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": _duration(retry.initial_backoff_seconds),
        "maxBackoff": _duration(retry.max_backoff_seconds),
        "backoffMultiplier": retry.backoff_multiplier,
        "retryableStatusCodes": list(retry.retryable_status_codes),
    }
    unary = sorted(set(unary_methods))
    method_config: list[dict[str, Any]] = []
    if unary:
        method_config.append(
            {
                "name": [{"service": s, "method": m} for s, m in unary],
                "waitForReady": True,
                "timeout": _duration(unary_timeout),
                "retryPolicy": retry_policy,
            }
        )
    # Method-specific entries win over service-wide ones, so this covers the remaining (streaming) methods.
    names = [{"service": s} for s in sorted(set(services))]
    method_config.append({"name": names, "retryPolicy": retry_policy})
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": method_config,
        "retryThrottling": {
            "maxTokens": retry.throttle_max_tokens,
            "tokenRatio": retry.throttle_token_ratio,
        },
    }
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return json.dumps(config, sort_keys=True)


def _ip_kind(host: str) -> str | None:
    """ "ipv4" / "ipv6" for an IP literal (IPv6 in brackets), None for a host name."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        return None
    if address.version == 6 and not host.startswith("["):
        return None  # an unbracketed IPv6 address cannot carry a port
    return "ipv4" if address.version == 4 else "ipv6"


def normalize_target(target: str) -> str:
    """A gRPC target for `target`, turning the documented comma list into an ``ipv4:``/``ipv6:`` list.

    ``"127.0.0.1:5001,127.0.0.2:5002"`` -> ``"ipv4:127.0.0.1:5001,127.0.0.2:5002"``; every other form
    (``host:port``, ``dns:///name:port``, ``ipv4:a:p,b:q``, ``unix:...``) is returned unchanged.
    Raises ValueError for a comma list of host names or of mixed address families.
    """
    target = target.strip()
    if "," not in target or ":" not in target.split(",", 1)[0] or _has_scheme(target):
        return target
    kinds = set()
    for item in (part.strip() for part in target.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{item!r} in the address list {target!r} is not HOST:PORT")
        kind = _ip_kind(host)
        if kind is None:
            raise ValueError(
                f"{item!r} in {target!r}: a comma list takes IP addresses only (gRPC resolves one name "
                "per channel); give one DNS name that resolves to every replica, e.g. a headless Service"
            )
        kinds.add(kind)
    if len(kinds) != 1:
        raise ValueError(f"{target!r} mixes IPv4 and IPv6 addresses; gRPC takes one family per target")
    return f"{kinds.pop()}:" + ",".join(part.strip() for part in target.split(","))


def _has_scheme(target: str) -> bool:
    return target.lower().startswith(("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:"))


def target_addresses(target: str) -> list[str] | None:
    """The addresses a static target lists (``ipv4:``/``ipv6:`` or a comma list); None for a name that
    DNS (or another resolver) resolves, whose address count is only known at run time."""
    normalized = normalize_target(target)
    for scheme in SCHEMES_WITH_LISTS:
        if normalized.startswith(scheme):
            return [a.strip() for a in normalized[len(scheme) :].split(",") if a.strip()]
    return None


def channel_options(
    base: Sequence[tuple[str, Any]],
    services: Iterable[str],
    unary_methods: Iterable[tuple[str, str]] = (),
    *,
    health_service: str | None = None,
) -> list[tuple[str, Any]]:
    """`base` options plus the service config (and retries switched on explicitly)."""
    return [
        *base,
        ("grpc.service_config", service_config(services, unary_methods, health_service=health_service)),
        ("grpc.enable_retries", 1),
    ]


def make_channel(
    target: str,
    base_options: Sequence[tuple[str, Any]],
    services: Iterable[str],
    unary_methods: Iterable[tuple[str, str]] = (),
    *,
    health_service: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to `target` (normalised) with the policy of this module; TLS with `credentials`, and
    `token` sent as a bearer token on every call."""
    options = channel_options(base_options, services, unary_methods, health_service=health_service)
    if credentials is None:
        channel = grpc.insecure_channel(normalize_target(target), options=options)
    else:
        channel = grpc.secure_channel(normalize_target(target), credentials, options=options)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None or str(path) == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {str(path)!r}: {e.strerror or e}") from None


def channel_credentials(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: `ca` the CA bundle that signed the server's certificate (None =
    the system's roots), `cert`/`key` this side's certificate and key for mutual TLS (both or neither).

    ValueError names the file that cannot be read or the half of a pair that is missing.
    """
    if (cert is None or str(cert) == "") != (key is None or str(key) == ""):
        raise ValueError("mutual TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA bundle"),
        private_key=_read(key, "TLS key"),
        certificate_chain=_read(cert, "TLS certificate"),
    )


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (replacing one in the call's metadata)."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError("a token is one word of printable characters (no spaces)")
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never the token itself
        return "BearerToken(***)"

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def unary_methods_of(file_descriptors: Iterable[Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(service full names, unary (service, method) pairs) of generated `*_pb2.DESCRIPTOR`s."""
    services: list[str] = []
    unary: list[tuple[str, str]] = []
    for fd in file_descriptors:
        for service in fd.services_by_name.values():
            services.append(service.full_name)
            for m in service.methods:
                if not m.client_streaming and not m.server_streaming:
                    unary.append((service.full_name, m.name))
    return services, unary
