"""The Editor service: the front door that runs one video through the stages for one or many edits.

It does no heavy work itself. It always talks to the stages over gRPC -- even when they live in the same
process -- so the same code runs embedded and split into separate deployments:

  1. Inversion.Invert once (its events are streamed to the caller with edit_index -1);
  2. for every distinct edit, Propagation.Propagate (or Keyframes.EditKeyframes when `keyframes_only`),
     one after the other, streaming each stage event with the index of the edit it belongs to.

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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from services.convert import decode_spec_from_proto, edit_spec_from_proto, inversion_spec_from_proto
from services.errors import DeadlineExceeded, outcome_for, relayed
from services.metrics import Metrics
from services.store import ArtifactStore, is_digest
from tokenflow.errors import Cancelled, SpecError
from tokenflow.keys import canonical_json
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
MAX_EDITS = 64
"""Edits per request: enough for a prompt sweep; beyond it a caller should split the request."""

_NO_DEADLINE = 10 * 365 * 24 * 3600.0

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Results and progress events are small; 16 MiB is generous without being unbounded.
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    # Notice a dead stage during long, quiet jobs (e.g. while queued). Five minutes matches a gRPC
    # server's default minimum accepted ping interval, so pings never earn a GOAWAY (too_many_pings).
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


def canonical_edit(edit: common_pb2.EditSpec) -> bytes:
    """Bytes that are equal exactly when two EditSpecs name the same result at the stage.

    Uses the stages' own proto -> spec conversion (unset optional fields -> documented defaults) and the
    canonical encoding their content addresses hash, so the Editor's dedupe can never disagree with the
    cache. Raises SpecError for an invalid edit.
    """
    return canonical_json(edit_spec_from_proto(edit).to_dict())


class _DownstreamCall:
    """The one stage call an Edit is waiting on, cancellable from the caller's termination callback.

    Once `cancel` has run (the caller left, or the Edit finished), any call started later is cancelled
    at once, so no stage job outlives the RPC that asked for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._closed = False

    def start(self, call: grpc.Call) -> None:
        with self._lock:
            self._call = call
            closed = self._closed
        if closed:
            call.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._closed = True
            call, self._call = self._call, None
        if call is not None:
            call.cancel()


class EditorServicer(editor_pb2_grpc.EditorServicer):
    """Orchestrates Inversion, then Keyframes or Propagation per edit, through gRPC stubs."""

    def __init__(
        self,
        inversion_target: str,
        keyframes_target: str,
        propagation_target: str,
        artifacts_store: ArtifactStore,
        metrics: Metrics,
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
        # One channel per distinct target: in the embedded mode all three stages share one connection.
        self._channels: dict[str, grpc.Channel] = {}
        for target in (inversion_target, keyframes_target, propagation_target):
            if target not in self._channels:
                self._channels[target] = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self._inversion = inversion_pb2_grpc.InversionStub(self._channels[inversion_target])
        self._keyframes = keyframes_pb2_grpc.KeyframesStub(self._channels[keyframes_target])
        self._propagation = propagation_pb2_grpc.PropagationStub(self._channels[propagation_target])

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
        try:
            yield from self._edit(request, context, downstream)
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
    ) -> Iterator[editor_pb2.EditResponse]:
        edit_keys = _validate(request)

        invert = inversion_pb2.InvertRequest(video_digest=request.video_digest)
        if request.HasField("decode"):
            invert.decode.CopyFrom(request.decode)
        if request.HasField("inversion"):
            invert.inversion.CopyFrom(request.inversion)
        inversion: common_pb2.Result | None = None
        for event in self._call("inversion", self._inversion.Invert, invert, context, downstream):
            if event.WhichOneof("event") == "result":
                inversion = event.result
            yield _tagged(-1, event)
        if inversion is None:
            raise RuntimeError("the inversion stage ended its stream without a result")

        # Distinct edits in order of first appearance, each with every index that asked for it.
        groups: dict[bytes, list[int]] = {}
        for index, key in enumerate(edit_keys):
            groups.setdefault(key, []).append(index)

        for indices in groups.values():
            first = indices[0]
            edit = request.edits[first]
            if request.keyframes_only:
                method: Any = self._keyframes.EditKeyframes
                stage_request: Any = keyframes_pb2.EditKeyframesRequest(
                    inversion_digest=inversion.digest, edit=edit
                )
            else:
                method = self._propagation.Propagate
                stage_request = propagation_pb2.PropagateRequest(inversion_digest=inversion.digest, edit=edit)
            result: common_pb2.Result | None = None
            for event in self._call(_stage(request), method, stage_request, context, downstream):
                if event.WhichOneof("event") == "result":
                    result = event.result
                yield _tagged(first, event)
            if result is None:
                raise RuntimeError(f"the {_stage(request)} stage ended its stream without a result")
            for duplicate in indices[1:]:
                # Same edit as `first`: nothing more was computed for it.
                copy = common_pb2.Result()
                copy.CopyFrom(result)
                copy.cache_hit = True
                yield editor_pb2.EditResponse(edit_index=duplicate, result=copy)

    def _call(
        self,
        stage: str,
        method: Any,
        request: Any,
        context: grpc.ServicerContext,
        downstream: _DownstreamCall,
    ) -> Iterator[Any]:
        """Start a stage's streaming call with the caller's remaining time; yield its events.

        A failed call raises the stage's status with its details (services.errors.relayed), never the
        stage's address.
        """
        if not context.is_active():
            raise Cancelled("the caller cancelled the edit")
        remaining = _time_remaining(context)
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the caller's deadline passed")
        call = method(request, timeout=remaining)
        downstream.start(call)
        try:
            yield from call
        except grpc.RpcError as e:
            raise relayed(e, stage) from None


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


def _validate(request: editor_pb2.EditRequest) -> list[bytes]:
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
    decode_spec_from_proto(request.decode)
    inversion_spec_from_proto(request.inversion)
    keys = []
    for index, edit in enumerate(request.edits):
        try:
            keys.append(canonical_edit(edit))
        except SpecError as e:
            path = f"edits[{index}]"
            field = e.field.replace("edit.", path + ".", 1) if e.field else path
            raise SpecError(f"{path}: {e}", field=field) from None
    return keys


def _stage(request: editor_pb2.EditRequest) -> str:
    return "keyframes" if request.keyframes_only else "propagation"


def add_to_server(server: grpc.Server, servicer: EditorServicer) -> None:
    """Register the servicer on a `grpc.server`."""
    editor_pb2_grpc.add_EditorServicer_to_server(servicer, server)
