"""Truthful health and the ServerInfo RPC: what a server is, and whether (and why not) it can serve.

`Readiness` is the one place that decides every hosted service's grpc.health.v1 status:

- a stage (Inversion, Keyframes, Propagation) is SERVING only once the model is loaded and warmed, when
  the server preloads it (the default and every deployment). While it loads the stage is NOT_SERVING
  ("loading the model"); when the load fails it stays NOT_SERVING with the reason in the log, in
  `tokenflow_model_ready` / `tokenflow_model_load_failures_total` and in ServerInfo, and the load is
  retried in the background. A server started without preloading loads on the first request, so its
  stages say SERVING from the start (nothing else would ever load the model);
- the Artifacts, Editor and ServerInfo services need no model and are SERVING;
- the overall status ("") is SERVING only when every hosted service is;
- everything turns NOT_SERVING the moment a drain starts, and stays so.

Load balancers (Kubernetes readiness probes, the Editor's health-checking channels) therefore route no
call to a replica that would fail it. ServerInfo answers in every state, so an operator can always ask
a pod what is wrong.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from services import model_host as mh
from services.config import ServerConfig
from services.metrics import Metrics
from services.store import ArtifactStore
from tokenflow_pb.v1 import server_info_pb2, server_info_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = server_info_pb2.DESCRIPTOR.services_by_name["ServerInfo"].full_name
STAGE_SERVICES = frozenset({"tokenflow.v1.Inversion", "tokenflow.v1.Keyframes", "tokenflow.v1.Propagation"})
STORE_WRITERS = STAGE_SERVICES | {"tokenflow.v1.Artifacts"}
"""The services that cannot serve while the store cannot write (a full disk)."""
DRAINING_REASON = "draining: the server is shutting down"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_LIMIT_ATTRIBUTES = {"max_concurrent_rpcs": "rpc_limit"}  # Limits field -> ServerConfig attribute
_EDITOR_LIMITS = frozenset({"max_edits_per_request", "edit_parallelism"})  # from the Editor, 0 without one
_MODEL_STATES = {
    mh.NOT_LOADED: server_info_pb2.MODEL_STATE_NOT_LOADED,
    mh.LOADING: server_info_pb2.MODEL_STATE_LOADING,
    mh.READY: server_info_pb2.MODEL_STATE_READY,
    mh.FAILED: server_info_pb2.MODEL_STATE_FAILED,
}


def server_version() -> str:
    try:
        return importlib.metadata.version("tokenflow-service")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Readiness:
    """Derives each hosted service's health from the model's state and the drain flag, and publishes it."""

    def __init__(
        self,
        health: grpc_health.HealthServicer,
        metrics: Metrics,
        model_host: mh.ModelHost | None,
        preload: bool,
    ) -> None:
        self._health = health
        self._metrics = metrics
        self._model_host = model_host
        self._preload = preload
        self._lock = threading.Lock()
        self._services: tuple[str, ...] = ()
        self._draining = False
        self._status: dict[str, tuple[bool, str]] = {}
        self._store_reason = ""

    def store_changed(self, reason: str) -> None:
        """The store can write again ("") or cannot (the reason): the writers' health follows."""
        with self._lock:
            self._store_reason = reason
            started = bool(self._services)
        if started:
            self._publish()

    def start(self, services: Sequence[str]) -> None:
        """Publish the statuses of `services` now and follow the model's state from here on."""
        with self._lock:
            self._services = tuple(services)
        if self._model_host is not None and any(s in STAGE_SERVICES for s in services):
            self._model_host.add_listener(self._on_model_state)
        else:
            self._publish()

    def drain(self) -> None:
        """NOT_SERVING everywhere, for good (called before a shutdown stops accepting jobs)."""
        with self._lock:
            self._draining = True
        self._publish()
        self._health.enter_graceful_shutdown()

    @property
    def draining(self) -> bool:
        return self._draining

    def _on_model_state(self, state: str, error: str) -> None:
        self._metrics.model_ready.set(1 if state == mh.READY else 0)
        if state == mh.FAILED:
            self._metrics.model_load_failures_total.inc()
        self._publish()

    def _stage_reason(self) -> str:
        """Why the stages cannot serve ("" = they can)."""
        host = self._model_host
        if host is None or not self._preload:
            return ""  # lazy loading: the first request loads the model (and a failed load is retried)
        if host.state == mh.READY:
            return ""
        if host.state == mh.FAILED:
            return f"the model cannot be loaded: {host.error}"
        return "loading the model"

    def _publish(self) -> None:
        with self._lock:  # held throughout, so concurrent changes reach the health service in order
            draining = self._draining
            stage_reason = "" if draining else self._stage_reason()
            status: dict[str, tuple[bool, str]] = {}
            for name in self._services:
                reason = DRAINING_REASON if draining else (stage_reason if name in STAGE_SERVICES else "")
                if not reason and not draining and name in STORE_WRITERS:
                    reason = self._store_reason
                status[name] = (not reason, reason)
            changed = {n: v for n, v in status.items() if self._status.get(n) != v}
            self._status = status
            for name, (serving, reason) in changed.items():
                self._metrics.service_serving.labels(service=name).set(1 if serving else 0)
                if not draining:
                    self._health.set(name, _SERVING if serving else _NOT_SERVING)
                if serving:
                    log.info("%s is SERVING", name)
                else:
                    log.warning("%s is NOT_SERVING: %s", name, reason)
            if not draining:
                overall = all(serving for serving, _ in status.values())
                self._health.set("", _SERVING if overall else _NOT_SERVING)

    def statuses(self) -> dict[str, tuple[bool, str]]:
        """{service: (serving, reason)} as last published."""
        with self._lock:
            return dict(self._status)

    def not_ready_reason(self) -> str:
        reasons = sorted({reason for serving, reason in self.statuses().values() if not serving})
        return "; ".join(reasons)


class ServerInfoServicer(server_info_pb2_grpc.ServerInfoServicer):
    """Answers GetServerInfo from the server's config, readiness, model host and store."""

    def __init__(
        self,
        config: ServerConfig,
        readiness: Readiness,
        model_host: mh.ModelHost | None,
        store: ArtifactStore,
        editor: Any = None,
        max_edits: int = 0,
    ) -> None:
        self._config = config
        self._readiness = readiness
        self._model_host = model_host
        self._store = store
        self.editor = editor
        self._max_edits = max_edits

    def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: server_info_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> server_info_pb2.GetServerInfoResponse:
        statuses = self._readiness.statuses()
        response = server_info_pb2.GetServerInfoResponse(
            version=server_version(),
            services=[
                server_info_pb2.ServiceStatus(name=name, serving=serving, reason=reason)
                for name, (serving, reason) in statuses.items()
            ],
            ready=bool(statuses) and all(serving for serving, _ in statuses.values()),
            not_ready_reason=self._readiness.not_ready_reason(),
            limits=self._limits(),
            store_tiers=self._tiers(),
            draining=self._readiness.draining,
        )
        if self._model_host is not None:
            response.model.CopyFrom(self._model())
        return response

    def _model(self) -> server_info_pb2.ModelInfo:
        host = self._model_host
        assert host is not None
        info = server_info_pb2.ModelInfo(
            name=host.model_name,
            device=host.device or "auto",
            dtype=host.dtype or "auto",
            test_model=host.is_test_model,
            state=_MODEL_STATES[host.state],
            error=host.error,
        )
        if host.loaded:
            model = host.get()
            info.fingerprint = model.fingerprint
            info.device = str(model.device)
            info.dtype = str(model.dtype).removeprefix("torch.")
        return info

    def _limits(self) -> server_info_pb2.Limits:
        """Every field of the proto's Limits, read from the ServerConfig attribute of the same name.

        The proto declares the limits once; a Duration field `x` reads `x_seconds` (unset when None);
        `_LIMIT_ATTRIBUTES` names the few attributes spelt otherwise, `_EDITOR_LIMITS` those only an
        Editor has. A config without a field's attribute fails here, and its test, not silently.
        """
        c = self._config
        limits = server_info_pb2.Limits()
        for field in limits.DESCRIPTOR.fields:
            if field.name in _EDITOR_LIMITS:
                continue
            if field.message_type is not None:  # google.protobuf.Duration
                seconds = getattr(c, f"{field.name}_seconds")
                if seconds is not None:
                    getattr(limits, field.name).FromNanoseconds(int(seconds * 1e9))
            else:
                setattr(limits, field.name, int(getattr(c, _LIMIT_ATTRIBUTES.get(field.name, field.name))))
        if self.editor is not None:
            limits.max_edits_per_request = self._max_edits
            limits.edit_parallelism = int(getattr(self.editor, "edit_parallelism", 1))
        return limits

    def _tiers(self) -> list[server_info_pb2.StoreTier]:
        store = self._store
        tiers = [
            server_info_pb2.StoreTier(
                name="local", location=str(store.directory), size_limit_bytes=int(store.size_limit)
            )
        ]
        shared = getattr(store, "shared", None)
        if shared is not None:
            tiers.append(
                server_info_pb2.StoreTier(
                    name=shared.name, location=shared.describe(), size_limit_bytes=int(shared.size_limit or 0)
                )
            )
        return tiers


def add_to_server(server: grpc.Server, servicer: ServerInfoServicer) -> None:
    server_info_pb2_grpc.add_ServerInfoServicer_to_server(servicer, server)
