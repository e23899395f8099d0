"""The Editor service: the front door that runs one video through the stages for one or many edits.

It does no heavy work itself. It always talks to the stages over gRPC -- even when they live in the same
process -- so the same code runs embedded and split into separate deployments:

  1. Inversion.Invert once (its events are streamed to the caller with edit_index -1);
  2. for every distinct edit, Propagation.Propagate (or Keyframes.EditKeyframes when `keyframes_only`),
     up to `edit_parallelism` of them at once on the stage's replicas (default: one per address the
     stage's target resolves to; one when embedded), streaming each stage event with the index of the
     edit it belongs to (events of different edits interleave; each edit's events stay in order).

The whole request (decode and inversion settings, every edit) is validated first, with the stages' own
proto -> spec conversion, so a bad prompt in the last edit fails at once rather than after the inversion.
Edits that are identical after filling in the documented defaults are computed once and the result is
reported for every index that asked for it. Edits identical to ones computed earlier are cache hits at
the stage, which also shares identical jobs in flight across callers.

The caller's deadline and cancellation reach the stages: each downstream call gets the caller's remaining
time as its timeout, and a termination callback on the caller's RPC cancels the outstanding downstream
call; a stage job whose every caller has gone is cancelled after its grace period. A downstream error ends
the stream with the stage's status and details (the stage's address never
appears in a message; an unreachable stage is UNAVAILABLE with reason STAGE_UNAVAILABLE).

Access control. The stage channels use TLS and the Editor's own token when the server is configured
so (services/tls.py, services/auth.py). The Editor calls the stages as an admin on behalf of its caller
(``x-tokenflow-on-behalf-of``), so stage jobs and their results belong to the caller, and it records
every result it relays as requested by the caller in its own server's ownership index
(services/access.py), where the caller downloads them.

Failover. A stage job is idempotent: its id is the content address of its result, so asking another
replica for it gives the same artifact (or re-attaches to the running job, or returns the stored result).
The stage channels balance round robin over the replicas that report SERVING (services/channels.py), and
a call waits for one at most `stage_wait_seconds`. The Editor re-submits a stage call when

- the replica died or drains mid-job: UNAVAILABLE, or a stream that broke (a transport failure without
  our status details, or a stream that ended without a result);
- the replica's queue is full: RESOURCE_EXHAUSTED carrying RetryInfo (reason QUEUE_FULL). The details
  decide, not the text: RESOURCE_EXHAUSTED without RetryInfo (INPUT_TOO_LARGE) is final.

The first re-submissions go at once (round robin picks the next replica); once every replica was tried
the Editor waits the server's RetryInfo delay (or a backoff) first. At most `FAILOVER_ATTEMPTS`
re-submissions per stage call, and no waiting once `FAILOVER_SECONDS` have passed since its first failure;
the caller's deadline bounds everything. Progress of a re-submitted job starts again from the new replica.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.access import OPEN, Access
from services.auth import Principal, call_metadata, current_principal
from services.channels import STAGE_CHANNEL_OPTIONS, backend_count, stage_channel
from services.convert import (
    decode_spec_from_proto,
    edit_spec_from_proto,
    inversion_spec_from_proto,
    spec_to_proto,
)
from services.errors import DeadlineExceeded, RelayedStatus, StageUnavailable, code_of, outcome_for, relayed
from services.metrics import Metrics
from services.request_limits import DEFAULT_REQUEST_LIMITS, MAX_EDITS, RequestLimits
from services.store import ArtifactStore, is_digest
from tokenflow.errors import Cancelled, SpecError
from tokenflow.keys import canonical_json
from tokenflow.shards import shard_ranges
from tokenflow.specs import EditSpec
from tokenflow_pb.v1 import (
    common_pb2,
    editor_pb2,
    editor_pb2_grpc,
    inversion_pb2,
    inversion_pb2_grpc,
    keyframes_pb2,
    keyframes_pb2_grpc,
    propagation_pb2,
    propagation_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAME = editor_pb2.DESCRIPTOR.services_by_name["Editor"].full_name

_NO_DEADLINE = 10 * 365 * 24 * 3600.0

CHANNEL_OPTIONS = STAGE_CHANNEL_OPTIONS
"""The stage channels' base options (declared in services.channels)."""
FAILOVER_ATTEMPTS = 4
"""Re-submissions of one stage call to another replica, at most."""
FAILOVER_SECONDS = 300.0
"""After this long since a stage call first failed, a failure is final instead of waited out."""
_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)
"""Waits before a re-submission once every replica was tried, when the server sent no RetryInfo."""
_BACKENDS_TTL_SECONDS = 30.0


def canonical_edit(edit: common_pb2.EditSpec) -> bytes:
    """Bytes that are equal exactly when two EditSpecs name the same result at the stage.

    Uses the stages' own proto -> spec conversion (unset optional fields -> documented defaults) and the
    canonical encoding their content addresses hash, so the Editor's dedupe can never disagree with the
    cache. Raises SpecError for an invalid edit.
    """
    return _edit_key(edit_spec_from_proto(edit))


def _edit_key(spec: EditSpec) -> bytes:
    return canonical_json(spec.to_dict())


class _DownstreamCall:
    """The stage calls an Edit is waiting on (several with fan-out), cancellable from the caller's
    termination callback.

    Once `cancel` has run (the caller left, the Edit failed or finished), any call started later is
    cancelled at once, so no stage job outlives the RPC that asked for it; `closed` also interrupts a
    failover's wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[grpc.Call] = set()
        self.closed = threading.Event()

    def start(self, call: grpc.Call) -> None:
        with self._lock:
            self._calls.add(call)
            closed = self.closed.is_set()
        if closed:
            call.cancel()

    def finish(self, call: grpc.Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def cancel(self) -> None:
        with self._lock:
            self.closed.set()
            calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()


class EditorServicer(editor_pb2_grpc.EditorServicer):
    """Orchestrates Inversion, then Keyframes or Propagation per edit, through gRPC stubs."""

    request_limits: RequestLimits = DEFAULT_REQUEST_LIMITS
    """This server's request limits, checked on the whole request before the inversion runs."""

    def __init__(
        self,
        inversion_target: str,
        keyframes_target: str,
        propagation_target: str,
        artifacts_store: ArtifactStore,
        metrics: Metrics,
        edit_parallelism: int | None = None,
        stage_wait_seconds: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        access: Access = OPEN,
        inversion_shards: int = 1,
        inversion_shard_frames: int = 0,
    ) -> None:
        for name, target in (
            ("inversion", inversion_target),
            ("keyframes", keyframes_target),
            ("propagation", propagation_target),
        ):
            if not target:
                raise ValueError(f"the Editor needs the {name} service's address (host:port)")
        # The store is shared with the stages; the Editor only reads and writes through them, so that a
        # split deployment behaves exactly like the embedded one. Kept for symmetry with the stages.
        self.store = artifacts_store
        self.metrics = metrics
        self.stage_wait_seconds = stage_wait_seconds
        self.access = access
        self.inversion_shards = inversion_shards
        self.inversion_shard_frames = inversion_shard_frames
        self._edit_parallelism = edit_parallelism
        self._targets = {
            "inversion": inversion_target,
            "keyframes": keyframes_target,
            "propagation": propagation_target,
        }
        # One channel per stage, each checking its replicas' health for that stage's service name, so
        # round robin only picks replicas that can run the stage now.
        secure = {"credentials": credentials, "token": token}
        self._channels: dict[str, grpc.Channel] = {
            "inversion": stage_channel(
                inversion_target, "tokenflow.v1.Inversion", inversion_pb2.DESCRIPTOR, **secure
            ),
            "keyframes": stage_channel(
                keyframes_target, "tokenflow.v1.Keyframes", keyframes_pb2.DESCRIPTOR, **secure
            ),
            "propagation": stage_channel(
                propagation_target, "tokenflow.v1.Propagation", propagation_pb2.DESCRIPTOR, **secure
            ),
        }
        self._inversion = inversion_pb2_grpc.InversionStub(self._channels["inversion"])
        self._keyframes = keyframes_pb2_grpc.KeyframesStub(self._channels["keyframes"])
        self._propagation = propagation_pb2_grpc.PropagationStub(self._channels["propagation"])
        self._backends_lock = threading.Lock()
        self._backends: dict[str, tuple[float, int]] = {}

    @property
    def edit_parallelism(self) -> int:
        """Distinct edits of one request that run at once (propagation's replica count unless set)."""
        if self._edit_parallelism is not None:
            return self._edit_parallelism
        return self.backends("propagation")

    def backends(self, stage: str) -> int:
        """How many replicas the stage's target names now (re-resolved every 30 s)."""
        now = time.monotonic()
        with self._backends_lock:
            cached = self._backends.get(stage)
        if cached is not None and now - cached[0] < _BACKENDS_TTL_SECONDS:
            return cached[1]
        count = backend_count(self._targets[stage])
        with self._backends_lock:
            self._backends[stage] = (now, count)
        return count

    def close(self) -> None:
        """Close the channels to the stages (call on server shutdown)."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    # -- Edit ----------------------------------------------------------------------------------------------

    def Edit(  # noqa: N802 - gRPC method name
        self, request: editor_pb2.EditRequest, context: grpc.ServicerContext
    ) -> Iterator[editor_pb2.EditResponse]:
        downstream = _DownstreamCall()
        context.add_callback(downstream.cancel)
        principal = current_principal()
        try:
            yield from self._edit(request, context, downstream, principal)
        except Exception as e:  # mapped to a status by services.errors.ErrorInterceptor
            outcome = outcome_for(e)
            if outcome not in ("cancelled", "deadline_exceeded"):
                log.info("edit of %s failed: %s: %s", request.video_digest[:12], outcome, e)
            raise
        finally:
            downstream.cancel()

    def _edit(
        self,
        request: editor_pb2.EditRequest,
        context: grpc.ServicerContext,
        downstream: _DownstreamCall,
        principal: Principal | None = None,
    ) -> Iterator[editor_pb2.EditResponse]:
        edit_keys = _validate(request, self.request_limits)
        metadata = call_metadata(principal)

        invert = inversion_pb2.InvertRequest(video_digest=request.video_digest)
        if request.HasField("decode"):
            invert.decode.CopyFrom(request.decode)
        if request.HasField("inversion"):
            invert.inversion.CopyFrom(request.inversion)
        inversion: common_pb2.Result | None = None
        shards = self._shard_decodes(request)
        if shards:  # frame ranges on the inversion replicas, then one merge under the unsharded address
            invert = yield from self._sharded(invert, shards, context, downstream, metadata)
        for event in self._call("inversion", self._inversion.Invert, invert, context, downstream, metadata):
            if event.WhichOneof("event") == "result":
                inversion = event.result
                self.access.record(inversion.digest, principal, "requested")
            yield _tagged(-1, event)
        if inversion is None:
            raise RuntimeError("the inversion stage ended its stream without a result")

        # Distinct edits in order of first appearance, each with every index that asked for it.
        groups: dict[bytes, list[int]] = {}
        for index, key in enumerate(edit_keys):
            groups.setdefault(key, []).append(index)
        runs = [
            self._edit_run(request, inversion.digest, indices, context, downstream, principal)
            for indices in groups.values()
        ]
        parallelism = 1 if request.keyframes_only else self.edit_parallelism
        if parallelism <= 1 or len(runs) <= 1:
            for run in runs:
                yield from run()
        else:
            yield from _interleaved(runs, min(parallelism, len(runs)), downstream)

    # -- sharded inversion ---------------------------------------------------------------------------------

    def _shard_decodes(self, request: editor_pb2.EditRequest) -> list[common_pb2.DecodeSpec]:
        """The decode specs of the frame ranges to invert apart, or [] to invert unsharded.

        `inversion_shards` > 1 shards every inversion; otherwise `inversion_shard_frames` > 0 shards clips
        of at least that many frames into one range per inversion replica. The frame count is the
        container's (probed from the uploaded video); the last range always runs to the end of the
        selection, so the ranges cover the clip even when that count is a little off.
        """
        shards = self.inversion_shards
        if shards <= 1 and self.inversion_shard_frames <= 0:
            return []
        decode = decode_spec_from_proto(request.decode)
        frames = self._selected_frames(request.video_digest, decode)
        if frames is None:
            return []
        if shards <= 1:
            if frames < self.inversion_shard_frames:
                return []
            shards = self.backends("inversion")
        if shards <= 1 or frames < 2:
            return []
        ranges = shard_ranges(frames, shards)
        out = []
        for i, (start, stop) in enumerate(ranges):
            last = i == len(ranges) - 1
            part = decode.replace(
                start=decode.start + start * decode.stride,
                max_frames=None if last and decode.max_frames is None else stop - start,
            )
            out.append(spec_to_proto(part, common_pb2.DecodeSpec))
        return out

    def _selected_frames(self, video_digest: str, decode: Any) -> int | None:
        """How many frames the decode spec selects from the uploaded video (None if it cannot tell)."""
        from tokenflow.video import probe

        try:
            with self.store.pin(video_digest):
                video = self.store.get(video_digest, kind="video")
                if video is None:
                    return None
                info = probe(video.path(video.manifest.primary or video.names()[0]))
        except Exception as e:  # noqa: BLE001 - the inversion stage reports unreadable videos properly
            log.info("cannot count the frames of %s to shard its inversion: %s", video_digest[:12], e)
            return None
        if not info.frame_count:
            return None
        selected = len(range(decode.start, int(info.frame_count), decode.stride))
        return selected if decode.max_frames is None else min(selected, decode.max_frames)

    def _sharded(
        self,
        invert: inversion_pb2.InvertRequest,
        shards: list[common_pb2.DecodeSpec],
        context: grpc.ServicerContext,
        downstream: _DownstreamCall,
        metadata: Any,
    ) -> Iterator[editor_pb2.EditResponse]:
        """Invert the frame ranges concurrently (round robin spreads them over the replicas), streaming
        their events as the inversion's; returns the merge request. Nothing is computed if the whole
        inversion is stored already."""
        lookup = inversion_pb2.InvertRequest()
        lookup.CopyFrom(invert)
        lookup.stored_only = True
        try:
            events = list(
                self._call("inversion", self._inversion.Invert, lookup, context, downstream, metadata)
            )
            if any(e.WhichOneof("event") == "result" for e in events):
                return invert  # stored: the request as it is returns it at once
        except RelayedStatus as e:
            if code_of(e.status) != grpc.StatusCode.NOT_FOUND:
                raise
        digests: dict[int, str] = {}

        def shard_run(index: int, decode: common_pb2.DecodeSpec) -> Callable[[], Iterator[Any]]:
            request = inversion_pb2.InvertRequest(video_digest=invert.video_digest, decode=decode)
            if invert.HasField("inversion"):
                request.inversion.CopyFrom(invert.inversion)

            def run() -> Iterator[editor_pb2.EditResponse]:
                for event in self._call("inversion", self._inversion.Invert, request, context, downstream,
                                        metadata):  # fmt: skip
                    if event.WhichOneof("event") == "result":
                        digests[index] = event.result.digest
                    else:
                        yield _tagged(-1, event)

            return run

        runs = [shard_run(i, decode) for i, decode in enumerate(shards)]
        yield from _interleaved(runs, len(runs), downstream, reset=False)
        merge = inversion_pb2.InvertRequest()
        merge.CopyFrom(invert)
        merge.shard_digests.extend(digests[i] for i in range(len(shards)))
        log.info("inversion of %s: %d shards inverted, merging", invert.video_digest[:12], len(shards))
        return merge

    def _edit_run(
        self,
        request: editor_pb2.EditRequest,
        inversion_digest: str,
        indices: list[int],
        context: grpc.ServicerContext,
        downstream: _DownstreamCall,
        principal: Principal | None = None,
    ) -> Callable[[], Iterator[editor_pb2.EditResponse]]:
        """The events of one distinct edit (and the copies of its result for its duplicates), lazily."""
        first = indices[0]
        edit = request.edits[first]
        stage = _stage(request)
        if request.keyframes_only:
            method: Any = self._keyframes.EditKeyframes
            stage_request: Any = keyframes_pb2.EditKeyframesRequest(
                inversion_digest=inversion_digest, edit=edit
            )
        else:
            method = self._propagation.Propagate
            stage_request = propagation_pb2.PropagateRequest(inversion_digest=inversion_digest, edit=edit)

        def run() -> Iterator[editor_pb2.EditResponse]:
            result: common_pb2.Result | None = None
            calls = self._call(stage, method, stage_request, context, downstream, call_metadata(principal))
            for event in calls:
                if event.WhichOneof("event") == "result":
                    result = event.result
                    self.access.record(result.digest, principal, "requested")
                yield _tagged(first, event)
            if result is None:
                raise RuntimeError(f"the {stage} stage ended its stream without a result")
            for duplicate in indices[1:]:
                # Same edit as `first`: nothing more was computed for it.
                copy = common_pb2.Result()
                copy.CopyFrom(result)
                copy.cache_hit = True
                yield editor_pb2.EditResponse(edit_index=duplicate, result=copy)

        return run

    def _call(
        self,
        stage: str,
        method: Any,
        request: Any,
        context: grpc.ServicerContext,
        downstream: _DownstreamCall,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Iterator[Any]:
        """Run a stage's streaming call with the caller's remaining time, failing over (module docstring);
        yield its events.

        A final failure raises the stage's status with its details (services.errors.relayed), never the
        stage's address.
        """
        failures = 0
        first_failure: float | None = None
        while True:
            if not context.is_active() or downstream.closed.is_set():
                raise Cancelled("the caller cancelled the edit")
            remaining = _time_remaining(context)
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the caller's deadline passed")
            self._wait_for_replica(stage, remaining, downstream)
            call = method(
                request, timeout=_time_remaining(context), wait_for_ready=True, metadata=metadata or None
            )
            downstream.start(call)
            got_result = False
            error: grpc.RpcError | None = None
            try:
                for event in call:
                    got_result = got_result or event.WhichOneof("event") == "result"
                    yield event
            except grpc.RpcError as e:
                error = e
            finally:
                downstream.finish(call)
            if got_result:
                return
            if not context.is_active() or downstream.closed.is_set():
                raise Cancelled("the caller cancelled the edit")
            reason, delay = _failover_reason(error)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if reason is None or failures >= FAILOVER_ATTEMPTS or now - first_failure > FAILOVER_SECONDS:
                if error is None:
                    raise RuntimeError(f"the {stage} stage ended its stream without a result")
                raise relayed(error, stage) from None
            failures += 1
            self.metrics.stage_failovers_total.labels(stage=stage, reason=reason).inc()
            # The first re-submissions go to the next replicas at once; after a full round, wait.
            wait = 0.0
            if failures >= self.backends(stage):
                wait = (
                    delay if delay is not None else _BACKOFF_SECONDS[min(failures, len(_BACKOFF_SECONDS)) - 1]
                )
            remaining = _time_remaining(context)
            if remaining is not None:
                wait = min(wait, max(0.0, remaining - 0.1))
            log.warning(
                "%s call failed (%s); re-submitting to another replica in %.1f s (attempt %d of %d)",
                stage,
                reason,
                wait,
                failures + 1,
                FAILOVER_ATTEMPTS + 1,
            )
            if wait > 0 and downstream.closed.wait(wait):
                raise Cancelled("the caller cancelled the edit")

    def _wait_for_replica(self, stage: str, remaining: float | None, downstream: _DownstreamCall) -> None:
        """Wait-for-ready, bounded: block until a replica of `stage` is SERVING, at most
        `stage_wait_seconds` (and the caller's remaining time); StageUnavailable after that."""
        bound = self.stage_wait_seconds if remaining is None else min(self.stage_wait_seconds, remaining)
        ready = grpc.channel_ready_future(self._channels[stage])
        try:
            ready.result(timeout=max(0.0, bound))
        except grpc.FutureTimeoutError:
            raise StageUnavailable(stage) from None
        finally:
            ready.cancel()


def _failover_reason(error: grpc.RpcError | None) -> tuple[str | None, float | None]:
    """(metrics reason, RetryInfo delay) when another replica may answer the call; (None, None) if not.

    Decided by the status code and details only: UNAVAILABLE (replica gone or draining); a transport
    failure without our status details (a stream that broke); RESOURCE_EXHAUSTED with RetryInfo (a full
    queue); a stream that ended without a result (error None).
    """
    if error is None:
        return "stream_ended", None
    code = error.code() if callable(getattr(error, "code", None)) else None
    status = None
    if isinstance(error, grpc.Call):
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # malformed details: treat as none
            status = None
    delay = _retry_delay(status)
    if code == grpc.StatusCode.UNAVAILABLE:
        return "unavailable", delay
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return "queue_full", delay
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and status is None:
        return "stream_broken", None  # our servers always send details; this came from the transport
    return None, None


def _retry_delay(status: Any) -> float | None:
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _interleaved(
    runs: list[Callable[[], Iterator[Any]]], parallelism: int, downstream: _DownstreamCall, reset: bool = True
) -> Iterator[Any]:
    """Run each of `runs` in a thread, at most `parallelism` at once, yielding their events as they come.

    The first failure ends the whole Edit: the other stage calls are cancelled and it is raised. With
    `reset` False (more stage calls follow: the shards of an inversion), calls are cancelled only then.
    """
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    _done = object()

    def work(run: Callable[[], Iterator[Any]]) -> None:
        try:
            if downstream.closed.is_set():
                return
            for event in run():
                events.put(("event", event))
        except BaseException as e:  # noqa: BLE001 - handed to the Edit's thread
            events.put(("error", e))
        finally:
            events.put(("done", _done))

    pool = futures.ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="edit")
    try:
        for run in runs:
            pool.submit(work, run)
        finished = 0
        while finished < len(runs):
            kind, item = events.get()
            if kind == "event":
                yield item
            elif kind == "error":
                raise item
            else:
                finished += 1
    except BaseException:
        if not reset:
            downstream.cancel()  # a failed shard: stop the other shards' stage calls
        raise
    finally:
        if reset:
            downstream.cancel()  # a failure or a departed caller: stop the other edits' stage calls
        pool.shutdown(wait=True, cancel_futures=True)


def _tagged(edit_index: int, event: Any) -> editor_pb2.EditResponse:
    """A stage's stream message (InvertResponse, PropagateResponse, ...) as the Editor's event."""
    which = event.WhichOneof("event")
    if which == "progress":
        return editor_pb2.EditResponse(edit_index=edit_index, progress=event.progress)
    if which == "result":
        return editor_pb2.EditResponse(edit_index=edit_index, result=event.result)
    raise RuntimeError("a stage sent an event that is neither progress nor a result")


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline (less a small margin), or None when it set none.

    grpc reports "no deadline" as a deadline in the far future (decades); passing that on as a timeout
    would overflow the downstream deadline, so anything beyond `_NO_DEADLINE` counts as none.
    """
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE:
        return None
    # A little less than the caller's time: gRPC rounds a timeout up on the wire, and the stage should
    # give up before the caller does, so the Editor can still tell the caller why.
    margin = min(0.5, max(0.02, 0.05 * float(remaining)))
    return max(0.0, float(remaining) - margin)


def _validate(request: editor_pb2.EditRequest, limits: RequestLimits = DEFAULT_REQUEST_LIMITS) -> list[bytes]:
    """Reject what the stages would reject, before the (long) inversion runs; returns each edit's key.

    A bad prompt in the third edit should fail in milliseconds, not after minutes of inverting.
    """
    if not request.video_digest:
        raise SpecError("video_digest is required: upload the video with Artifacts.Upload first")
    if not is_digest(request.video_digest):
        raise SpecError(
            f"malformed video_digest {request.video_digest[:80]!r}: expected 64 lowercase hex characters "
            "(the digest returned by Artifacts.Upload)"
        )
    if not request.edits:
        raise SpecError("give at least one edit (EditRequest.edits)")
    if len(request.edits) > MAX_EDITS:
        raise SpecError(
            f"{len(request.edits)} edits in one request; the limit is {MAX_EDITS}: split the request"
        )
    limits.check_edit_count(len(request.edits))
    decode_spec_from_proto(request.decode)
    limits.check_inversion(inversion_spec_from_proto(request.inversion))
    keys = []
    for index, edit in enumerate(request.edits):
        path = f"edits[{index}]"
        try:
            spec = edit_spec_from_proto(edit)
        except SpecError as e:
            field = e.field.replace("edit.", path + ".", 1) if e.field else path
            raise SpecError(f"{path}: {e}", field=field) from None
        limits.check_edit(spec, path)
        keys.append(_edit_key(spec))
    return keys


def _stage(request: editor_pb2.EditRequest) -> str:
    return "keyframes" if request.keyframes_only else "propagation"


def add_to_server(server: grpc.Server, servicer: EditorServicer) -> None:
    """Register the servicer on a `grpc.server`."""
    editor_pb2_grpc.add_EditorServicer_to_server(servicer, server)
