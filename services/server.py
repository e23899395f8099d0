"""`tokenflow serve`: one gRPC server hosting any subset of the services, plus a /metrics endpoint.

``--services all`` (the default) is the embedded single-process setup; ``--services inversion`` (etc.) is
one stage per deployment. Either way the Editor reaches the stages through gRPC at configured addresses
(its own address by default), so the same code runs both ways. Every server also serves the Artifacts
service, the ServerInfo service, ``grpc.health.v1`` (per service and overall ``""``, truthful: see
services/server_info.py) and server reflection (v1 and v1alpha). Connections are aged out after
``--max-connection-age-seconds`` (GOAWAY, then a grace), so clients re-resolve and new pods get traffic.

Shutdown (SIGTERM/SIGINT, or `RunningServer.stop`): health turns NOT_SERVING and new jobs get
UNAVAILABLE at once; running jobs get the shutdown grace to finish, then are cancelled (their callers get
UNAVAILABLE: retry elsewhere); then gRPC and /metrics stop. A second signal exits immediately (artifacts
are published atomically, so nothing partial is left).

Access control (README, "Access control"): the server binds loopback unless `--host` says otherwise;
`--tls-cert`/`--tls-key` (and `--tls-client-ca` for mutual TLS) make its port TLS-only
(services/tls.py); `--auth-token-file` puts `services.auth.AuthInterceptor` innermost, so the error
interceptor and the metrics see its refusals like any other status, and the servicers share one
`services.access.Access` over the store's ownership index.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc

from services import artifacts, reflection, server_info, tls
from services.access import Access
from services.auth import AuthInterceptor, TokenTable, read_token_file
from services.channels import server_options
from services.config import (  # noqa: F401 - build_parser/config_from_args re-exported for callers
    ServerConfig,
    build_parser,
    config_from_args,
    parse_args,
)
from services.errors import ErrorInterceptor
from services.grpc_metrics import PrometheusServerInterceptor
from services.limits import ConcurrencyLimiter
from services.logging_setup import configure_logging
from services.metrics import Metrics, MetricsServer
from services.model_host import ModelHost
from services.servicer import StageServicer
from services.store import ArtifactStore, make_shared_tier

log = logging.getLogger(__name__)

EDITOR_SERVICE_NAME = "tokenflow.v1.Editor"
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})


def _import_editor() -> Any:
    """services.editor if present (it is developed separately); None if the module does not exist."""
    try:
        from services import editor
    except ModuleNotFoundError as e:
        if e.name == "services.editor":
            return None
        raise
    return editor


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class RunningServer:
    """A started server. `port`/`metrics_port` are the bound ports (useful with port 0)."""

    config: ServerConfig
    server: grpc.Server
    port: int
    metrics: Metrics
    store: ArtifactStore
    health: grpc_health.HealthServicer
    service_names: tuple[str, ...]
    stages: dict[str, StageServicer] = field(default_factory=dict)
    model_host: ModelHost | None = None
    editor: Any = None
    readiness: server_info.Readiness | None = None
    metrics_server: MetricsServer | None = None
    owns_store: bool = False
    access: Access | None = None
    _executor: futures.ThreadPoolExecutor | None = None
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: bool = False
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    @property
    def target(self) -> str:
        """Where a client on this machine reaches the server (also the Editor's default stage address)."""
        host = "localhost" if self.config.host in _WILDCARD_HOSTS else self.config.host
        return _host_port(host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (see the module docstring); idempotent. `grace` defaults to the config's."""
        with self._stop_lock:
            if self._stopping:
                already = True
            else:
                already, self._stopping = False, True
        if already:
            self._stopped.wait()
            return
        grace = self.config.shutdown_grace if grace is None else max(0.0, grace)
        log.info("shutting down: running jobs get %.0f s to finish", grace)
        for stage in self.stages.values():
            stage.drain()  # before health changes, so a caller who sees NOT_SERVING also gets UNAVAILABLE
        if self.readiness is not None:
            self.readiness.drain()
        else:
            self.health.enter_graceful_shutdown()
        if self.model_host is not None:
            self.model_host.close()  # no more background load retries
        threads = [
            threading.Thread(target=stage.shutdown, args=(grace,), name=f"{name}-shutdown", daemon=True)
            for name, stage in self.stages.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Let streams deliver their final event or status, and transfers finish, for a little while.
        self.server.stop(grace=max(1.0, min(grace, 10.0))).wait()
        close = getattr(self.editor, "close", None)
        if callable(close):
            close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_store:
            self.store.close()
        if self.access is not None:
            self.access.close()
        self._stopped.set()
        log.info("server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop` has finished; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)


def _stage_classes() -> dict[str, tuple[type[StageServicer], Any]]:
    """Stage servicer classes and their add_to_server; imported only when a stage is hosted (torch)."""
    from services import inversion, keyframes, propagation

    return {
        "inversion": (inversion.InversionServicer, inversion.add_to_server),
        "keyframes": (keyframes.KeyframesServicer, keyframes.add_to_server),
        "propagation": (propagation.PropagationServicer, propagation.add_to_server),
    }


def initialise_metrics(metrics: Metrics, service_names: Sequence[str], stages: Sequence[str]) -> None:
    """Every label set this server can report, at zero from the start (see `Metrics.initialise`)."""
    from google.protobuf import descriptor_pool

    from tokenflow_pb.v1 import common_pb2

    pool = descriptor_pool.Default()
    rpcs = []
    for name in service_names:
        for m in pool.FindServiceByName(name).methods:
            kind = {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream"}
            rpcs.append((kind.get((m.client_streaming, m.server_streaming), "bidi_stream"), name, m.name))
    kinds = [
        v.name.removeprefix("ARTIFACT_KIND_").lower()
        for v in common_pb2.ArtifactKind.DESCRIPTOR.values
        if v.number != 0
    ]
    metrics.initialise(rpcs=rpcs, stages=stages, kinds=kinds)


def build_server(
    config: ServerConfig,
    *,
    model_host: ModelHost | None = None,
    store: ArtifactStore | None = None,
    metrics: Metrics | None = None,
) -> RunningServer:
    """Build, bind and start a server for `config`. Raises OSError if the port cannot be bound.

    `model_host`, `store` and `metrics` may be shared between servers (tests, or several servers in one
    process); by default each server makes its own from the config.
    """
    metrics = metrics if metrics is not None else Metrics()
    tokens = TokenTable.load(config.auth_token_file) if config.auth_token_file is not None else None
    internal_token = (
        read_token_file(config.internal_token_file)
        if config.internal_token_file is not None
        else (tokens.admin_token if tokens is not None else None)
    )
    if "editor" in config.services and tokens is not None and internal_token is None:
        raise ValueError(
            "the editor needs a token for the stages: add an admin line (TOKEN NAME admin) to "
            "--auth-token-file, or pass --internal-token-file"
        )
    server_credentials = tls.server_credentials(config)
    internal_credentials = tls.internal_channel_credentials(config) if "editor" in config.services else None
    owns_store = store is None
    if store is None:
        store = ArtifactStore(
            config.cache_dir,
            size_limit=config.cache_size_bytes,
            shared=make_shared_tier(
                config.shared_store,
                config.s3_bucket,
                config.s3_prefix,
                config.s3_endpoint_url,
                config.shared_store_size,
            ),
            metrics=metrics,
        )
    access = Access.open(store.directory, enabled=tokens is not None)
    executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc")
    limiter = ConcurrencyLimiter(config.rpc_limit)  # threads left for health (services/limits.py)
    interceptors: list[grpc.ServerInterceptor] = [
        PrometheusServerInterceptor(metrics),
        ErrorInterceptor(metrics),
        limiter,
    ]
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens, access.check_inputs))
    server = grpc.server(
        executor,
        # Outermost first: grpc_server_* metrics see the status the error interceptor sets.
        interceptors=interceptors,
        # so_reuseport 0: else Linux lets a second server bind the same port and silently share its traffic.
        options=[
            ("grpc.so_reuseport", 0),
            *server_options(config.max_connection_age_seconds, config.max_connection_age_grace_seconds),
        ],
    )
    stages: dict[str, StageServicer] = {}
    try:
        address = _host_port(config.host, config.port)
        try:
            if server_credentials is not None:
                port = server.add_secure_port(address, server_credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e} (is the port in use?)") from e
        if port == 0:
            raise OSError(f"cannot listen on {address} (is the port in use?)")

        names: list[str] = []
        artifacts_servicer = artifacts.ArtifactsServicer(
            store, max_upload_bytes=config.max_upload_bytes, metrics=metrics, access=access
        )
        artifacts_servicer.upload_idle_seconds = config.upload_idle_seconds
        artifacts.add_to_server(server, artifacts_servicer)
        names.append(artifacts.SERVICE_NAME)

        if config.stages:
            if model_host is None:
                model_host = ModelHost(config.model, device=config.device, dtype=config.dtype)
            for name, (cls, add) in _stage_classes().items():
                if name in config.stages:
                    stage = cls(
                        store,
                        model_host,
                        metrics,
                        max_queue=config.max_queue,
                        grace_seconds=config.job_grace_seconds,
                    )
                    stage.access = access
                    stage.decode_limits = config.decode_limits
                    stage.request_limits = config.request_limits
                    stage.features_budget = config.features_budget  # propagation; inversion (features_for)
                    add(server, stage)
                    stages[name] = stage
                    names.append(cls.service_name)
        from services import operations  # jobs under leases; any replica answers for any job

        holder = f"{os.uname().nodename} (port {port}, pid {os.getpid()})"
        names.append(operations.install(server, store, stages, holder, config.lease_seconds, access, metrics))

        running = RunningServer(
            config=config,
            server=server,
            port=port,
            metrics=metrics,
            store=store,
            health=grpc_health.HealthServicer(
                experimental_non_blocking=True,
                experimental_thread_pool=futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="health"
                ),
            ),
            service_names=(),
            stages=stages,
            model_host=model_host,
            owns_store=owns_store,
            access=access,
            _executor=executor,
        )

        if "editor" in config.services:
            editor_module = _import_editor()
            if editor_module is None:
                raise ValueError("this installation has no Editor service (services/editor.py is missing)")
            running.editor = editor_module.EditorServicer(
                inversion_target=config.inversion_addr or running.target,
                keyframes_target=config.keyframes_addr or running.target,
                propagation_target=config.propagation_addr or running.target,
                artifacts_store=store,
                metrics=metrics,
                # Embedded (no propagation address): one process, one model, so one edit at a time.
                edit_parallelism=config.edit_parallelism or (None if config.propagation_addr else 1),
                stage_wait_seconds=config.stage_wait_seconds,
                inversion_shards=config.inversion_shards,
                inversion_shard_frames=config.inversion_shard_frames,
                credentials=internal_credentials,
                token=internal_token,
                access=access,
            )
            running.editor.request_limits = config.request_limits
            editor_module.add_to_server(server, running.editor)
            names.append(EDITOR_SERVICE_NAME)

        running.readiness = server_info.Readiness(
            running.health, metrics, model_host if stages else None, preload=config.preload_model
        )
        store.add_health_listener(running.readiness.store_changed)  # NOT_SERVING while it cannot write
        server_info.add_to_server(
            server,
            server_info.ServerInfoServicer(
                config,
                running.readiness,
                model_host if stages else None,
                store,
                editor=running.editor,
                max_edits=config.max_edits_per_request if running.editor is not None else 0,
            ),
        )
        names.append(server_info.SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(running.health, server)
        running.readiness.start(names)
        running.service_names = tuple(names)
        initialise_metrics(metrics, names, config.stages)
        reflection.enable_server_reflection((*names, grpc_health.SERVICE_NAME), server)
        server.start()
    except BaseException:
        server.stop(grace=None)
        executor.shutdown(wait=False)
        for stage in stages.values():
            stage.jobs.shutdown(grace=0)
        if owns_store:
            store.close()
        access.close()
        raise

    if config.metrics_port is not None:
        try:
            running.metrics_server = metrics.serve(config.metrics_port, addr=config.metrics_host or "0.0.0.0")
        except OSError as e:
            running.stop(grace=0)
            raise OSError(f"cannot serve metrics on port {config.metrics_port}: {e}") from e

    if model_host is not None:
        if model_host.is_test_model:
            log.warning(
                "model %r is a test model with random weights: every output is noise. "
                "Pass --model /path/to/stable-diffusion-folder for real edits",
                model_host.model_name,
            )
        if config.preload_model and stages:
            model_host.load_in_background()  # the stages turn SERVING once it is loaded and warmed
    if config.host not in _LOOPBACK_HOSTS and (server_credentials is None or tokens is None):
        log.warning(
            "listening on %s without %s: anyone who reaches this address can use the server. "
            "Add them unless the network is trusted (README: Access control)",
            address,
            " and ".join(
                w for w, off in (("TLS", server_credentials is None), ("tokens", tokens is None)) if off
            ),
        )
    log.info("serving %s on %s", ", ".join(running.service_names), address)
    return running


# ----------------------------------------------------------------------------------------------------------
# command line (flags and environment: services.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tokenflow serve`; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"tokenflow serve: error: {e}", file=sys.stderr)
        return 2
    try:
        running = build_server(config)
    except (OSError, ValueError) as e:
        print(f"tokenflow serve: error: {e}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("received %s: shutting down gracefully", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    metrics_note = f"metrics :{running.metrics_port}" if running.metrics_port is not None else "metrics off"
    print(
        f"serving {config.describe_services()} on {_host_port(config.host, running.port)} ({metrics_note})",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
