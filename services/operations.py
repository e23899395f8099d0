"""google.longrunning.Operations on every server: any replica answers for any stage job of the fleet.

Why the standard service rather than our own: AIP-151 defines long-running operations as exactly this
service and message (googleapis-common-protos, already a dependency of grpcio-status on both the server
and the client), so generic tooling (google-api-core's operations client, grpcurl scripts, gateways)
works unchanged; what is ours goes into the two `Any` fields (tokenflow.v1.OperationMetadata while the
job runs, tokenflow.v1.Result once it is done: proto/tokenflow/v1/operations.proto). Our own copy of the
service would lint the same under buf STANDARD and only rename it.

An operation is ``operations/<digest>``, the content address of the artifact the job produces. What a
replica answers, in order:

1. a job queued or running *here*: not done, with its live progress;
2. the artifact published in the store (either tier): done, with the stage's Result;
3. the job's lease in the shared tier (services/store/lease.py): running on another replica (not done,
   with the progress its heartbeat carries); failed or cancelled (done, with the Status the stage call
   ended with); or abandoned -- its holder stopped heartbeating and no one took it over yet (done, with
   UNAVAILABLE: call the stage again and a replica resumes it);
4. otherwise NOT_FOUND.

`WaitOperation` polls those records until the job is done or the timeout (at most `MAX_WAIT_SECONDS`,
and the caller's deadline) passes, so a backend never needs to hold a stream open for the whole job.
`CancelOperation` cancels a local job and files a cancel request in the lease, which the holder and every
waiting replica see at their next heartbeat or poll. `DeleteOperation` is not implemented
(UNIMPLEMENTED): a finished operation is its artifact; delete that with Artifacts.Delete.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.longrunning import operations_pb2_grpc as lro_grpc
from google.longrunning import operations_proto_pb2 as lro_pb2
from google.protobuf import empty_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from services.access import OPEN, Access
from services.auth import current_principal
from services.convert import enum_value, progress_message
from services.store import ArtifactNotFound, ArtifactStore, Manifest, is_digest
from services.store.lease import CANCELLED, FAILED, SUCCEEDED, LeaseRecord, LeaseTable
from tokenflow.errors import SpecError
from tokenflow_pb.v1 import common_pb2, operations_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = lro_pb2.DESCRIPTOR.services_by_name["Operations"].full_name
PREFIX = "operations/"
JOB_KINDS = ("inversion", "keyframes", "propagation")
"""Artifact kinds a stage job produces (an upload is not an operation)."""
DEFAULT_WAIT_SECONDS = 60.0
MAX_WAIT_SECONDS = 600.0
POLL_SECONDS = 0.25
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
FILTERS = {"": None, "done=true": True, "done=false": False}
"""ListOperations filters (AIP-160, the subset that makes sense here), spaces ignored."""


def operation_name(key: str) -> str:
    return PREFIX + key


def key_of(name: str) -> str:
    """The digest an operation name carries (INVALID_ARGUMENT for anything else)."""
    key = name.removeprefix(PREFIX)
    if not name.startswith(PREFIX) or not is_digest(key):
        raise SpecError(
            f"malformed operation name {name[:90]!r}: expected 'operations/<digest>' "
            "(the digest is Progress.job_id or Result.digest)",
            field="name",
        )
    return key


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(epoch * 1e9))
    return ts


class OperationsServicer(lro_grpc.OperationsServicer):
    """google.longrunning.Operations over this server's jobs, the store and the fleet's leases."""

    def __init__(
        self,
        store: ArtifactStore,
        leases: LeaseTable,
        stages: Mapping[str, Any],
        holder: str,
        result_of: Callable[[Manifest], common_pb2.Result],
    ) -> None:
        self.store = store
        self.leases = leases
        self.stages = stages
        self.holder = holder
        self.result_of = result_of

    access: Access = OPEN
    """Access control (services/access.py): who sees and cancels which operation; set by `install`."""

    def _jobs(self, key: str) -> list[Any]:
        return [job for stage in self.stages.values() if (job := stage.jobs.get(key)) is not None]

    def _visible(self, key: str) -> bool:
        return self.access.may_see_operation(key, self._jobs(key), current_principal())

    # -- describing one operation --------------------------------------------------------------------------

    def _local(self, key: str) -> lro_pb2.Operation | None:
        for name, stage in self.stages.items():
            job = stage.jobs.get(key)
            if job is None or job.done:
                continue
            lease = self.leases.current(key)
            metadata = operations_pb2.OperationMetadata(
                stage=enum_value(common_pb2.Stage, name),
                progress=progress_message(key, job.latest_progress or {}),
                holder=self.holder if job.started is not None else "",
            )
            if lease is not None and not lease.done and not lease.expired():
                metadata.holder = lease.holder  # this replica may be waiting on another one's lease
                self._lease_times(metadata, lease)
            return self._operation(key, metadata)
        return None

    def _lease_times(self, metadata: operations_pb2.OperationMetadata, lease: LeaseRecord) -> None:
        metadata.attempt = lease.gen
        metadata.create_time.CopyFrom(_timestamp(lease.created))
        metadata.update_time.CopyFrom(_timestamp(lease.updated))
        metadata.cancel_requested = self.leases.cancel_requested(lease.key, lease.gen)

    def _operation(self, key: str, metadata: operations_pb2.OperationMetadata) -> lro_pb2.Operation:
        op = lro_pb2.Operation(name=operation_name(key))
        op.metadata.Pack(metadata)
        return op

    def describe(self, key: str) -> lro_pb2.Operation | None:
        """The operation's state as this replica sees it (see the module docstring); None if unknown."""
        local = self._local(key)
        if local is not None:
            return local
        lease = self.leases.current(key)
        manifest = self.store.stat(key)
        if manifest is not None and manifest.kind in JOB_KINDS:
            metadata = operations_pb2.OperationMetadata(
                stage=enum_value(common_pb2.Stage, manifest.kind),
                progress=common_pb2.Progress(
                    job_id=key, stage=enum_value(common_pb2.Stage, manifest.kind), message="done"
                ),
            )
            if lease is not None:
                metadata.holder = lease.holder
                self._lease_times(metadata, lease)
            op = self._operation(key, metadata)
            op.done = True
            op.response.Pack(self.result_of(manifest))
            return op
        if lease is None:
            return None
        metadata = operations_pb2.OperationMetadata(
            stage=enum_value(common_pb2.Stage, lease.stage),
            progress=progress_message(key, lease.progress),
            holder=lease.holder,
        )
        self._lease_times(metadata, lease)
        op = self._operation(key, metadata)
        if lease.state in (FAILED, CANCELLED) and lease.error:
            op.done = True
            op.error.CopyFrom(_status(lease.error))
        elif lease.state == SUCCEEDED:  # its artifact was pruned since: the job is gone
            return None
        elif lease.expired():
            op.done = True
            op.error.CopyFrom(
                status_pb2.Status(
                    code=code_pb2.UNAVAILABLE,
                    message="the replica computing this job stopped; call the stage again and a replica "
                    "resumes it under the same name",
                )
            )
        return op

    def _get(self, key: str) -> lro_pb2.Operation:
        op = self.describe(key)
        if op is None or not self._visible(key):  # someone else's operation does not exist for the caller
            raise ArtifactNotFound(
                f"no operation {operation_name(key)}: no job computes it and its artifact is not stored "
                "(it may have been evicted, or have failed more than an hour ago: call the stage again)"
            )
        return op

    # -- the RPCs ------------------------------------------------------------------------------------------

    def GetOperation(  # noqa: N802 - gRPC method name
        self, request: lro_pb2.GetOperationRequest, context: grpc.ServicerContext
    ) -> lro_pb2.Operation:
        return self._get(key_of(request.name))

    def WaitOperation(  # noqa: N802 - gRPC method name
        self, request: lro_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> lro_pb2.Operation:
        key = key_of(request.name)
        timeout = DEFAULT_WAIT_SECONDS
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout < 0:
                raise SpecError("timeout must not be negative", field="timeout")
        timeout = min(timeout, MAX_WAIT_SECONDS)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining - 0.5))  # answer before the caller gives up
        deadline = time.monotonic() + timeout
        while True:
            op = self._get(key)
            if op.done or time.monotonic() >= deadline or not context.is_active():
                return op
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def CancelOperation(  # noqa: N802 - gRPC method name
        self, request: lro_pb2.CancelOperationRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        key = key_of(request.name)
        op = self._get(key)
        if op.done:
            return empty_pb2.Empty()  # AIP-151: cancelling a finished operation changes nothing
        self.access.require_cancel_operation(key, self._jobs(key), current_principal())
        lease = self.leases.current(key)
        if lease is not None and not lease.done:
            self.leases.request_cancel(key, lease.gen)  # the holder and every waiter see it
        for stage in self.stages.values():
            stage.jobs.cancel(key, "cancelled by request (CancelOperation)")
        return empty_pb2.Empty()

    def ListOperations(  # noqa: N802 - gRPC method name
        self, request: lro_pb2.ListOperationsRequest, context: grpc.ServicerContext
    ) -> lro_pb2.ListOperationsResponse:
        if request.name not in ("", "operations"):
            raise SpecError("name must be 'operations' (or empty): there is one collection", field="name")
        compact = request.filter.replace(" ", "").lower()
        if compact not in FILTERS:
            raise SpecError(
                f"unsupported filter {request.filter[:60]!r}: use 'done = true' or 'done = false'",
                field="filter",
            )
        want_done = FILTERS[compact]
        if request.page_size < 0:
            raise SpecError("page_size must be >= 0", field="page_size")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(request.page_token)
        keys = {job.id for stage in self.stages.values() for job in stage.jobs.jobs()}
        keys.update(r.key for r in self.leases.records())
        out: list[lro_pb2.Operation] = []
        more = False
        for key in sorted(k for k in keys if after is None or k > after):
            op = self.describe(key)
            if op is None or (want_done is not None and op.done != want_done) or not self._visible(key):
                continue
            if len(out) == size:
                more = True
                break
            out.append(op)
        token = _encode_token(out[-1].name.removeprefix(PREFIX)) if more else ""
        return lro_pb2.ListOperationsResponse(operations=out, next_page_token=token)


def _status(error: Mapping[str, Any]) -> status_pb2.Status:
    """The Status a lease recorded (with its details), or one built from its code and message."""
    raw = error.get("status")
    if isinstance(raw, str):
        try:
            return status_pb2.Status.FromString(base64.b64decode(raw))
        except (ValueError, TypeError):
            pass
    return status_pb2.Status(
        code=int(error.get("code", code_pb2.UNKNOWN)), message=str(error.get("message", ""))
    )


def _encode_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(f"ops1:{last_key}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> str | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raw = ""
    version, _, key = raw.partition(":")
    if version != "ops1" or not is_digest(key):
        raise SpecError("page_token is not a token from a previous ListOperations call", field="page_token")
    return key


def add_to_server(server: grpc.Server, servicer: OperationsServicer) -> None:
    lro_grpc.add_OperationsServicer_to_server(servicer, server)


def result_builder(stages: Mapping[str, Any]) -> Callable[[Manifest], common_pb2.Result]:
    """Turns a stored manifest into its stage's Result: the hosted stage's own `result`, else that stage
    class's (imported on first use: an Editor-only server hosts no stage). `result` reads only the
    manifest, so a bare instance of the class is enough."""
    hosted = {stage.kind: stage for stage in stages.values()}

    def build(manifest: Manifest) -> common_pb2.Result:
        stage = hosted.get(manifest.kind)
        if stage is None:
            from services.server import _stage_classes

            cls = _stage_classes()[manifest.kind][0]
            stage = hosted[manifest.kind] = cls.__new__(cls)
        result: common_pb2.Result = stage.result(manifest, cache_hit=False)
        return result

    return build


def install(
    server: grpc.Server,
    store: ArtifactStore,
    stages: Mapping[str, Any],
    holder: str,
    lease_seconds: float,
    access: Access = OPEN,
    metrics: Any = None,
) -> str:
    """Wire a server for the fleet: its stages' jobs run under leases in the shared tier (or in the local
    cache directory without one), and it answers google.longrunning.Operations. Returns the service name."""
    from services.leasing import Coordinator
    from services.servicer import already_stored
    from services.store.lease import lease_table

    leases = lease_table(store.shared, store.directory)
    for stage in stages.values():

        def stored(key: str, kind: str = stage.kind) -> Any:
            return already_stored(store, key, kind)

        stage.jobs.coordinator = Coordinator(leases, holder, stored, ttl=lease_seconds, metrics=metrics)
    threading.Thread(target=_sweep_loop, args=(leases,), name="lease-sweep", daemon=True).start()
    servicer = OperationsServicer(store, leases, stages, holder, result_builder(stages))
    servicer.access = access
    add_to_server(server, servicer)
    return SERVICE_NAME


SWEEP_SECONDS = 600.0
"""How often a server removes leases that ended more than their retention (an hour) ago."""


def _sweep_loop(leases: LeaseTable) -> None:
    """Finished leases are kept for an hour (so any replica can say how a job ended), then swept: every
    server sweeps every ~10 minutes, jittered so replicas do not sweep in step (concurrent sweeps are
    harmless: deleting what is gone is a no-op)."""
    while True:
        time.sleep(SWEEP_SECONDS * random.uniform(0.5, 1.5))
        try:
            removed = leases.sweep()
        except Exception as e:  # noqa: BLE001 - the next sweep retries
            log.warning("lease sweep of %s failed: %s", leases.describe(), e)
            continue
        if removed:
            log.info("swept %d finished leases from %s", removed, leases.describe())
