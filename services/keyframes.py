"""The Keyframes stage: a fast preview of an edit (only one keyframe per window is edited, jointly).

The artifact holds one PNG per keyframe (``keyframe_0003.png`` for frame 3) and ``keyframes.json`` with
the indices; it has no primary file, so clients download each image by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import cv2
import grpc
import numpy as np

from services.jobs import JobContext
from services.plan import InversionInput, plan_edit
from services.progress import JobProgress
from services.results import common_warnings, model_meta
from services.servicer import JobOutput, Plan, StageServicer, already_stored
from services.store import Manifest
from tokenflow.editing import edit_keyframes
from tokenflow.errors import ModelError
from tokenflow.specs import EditSpec
from tokenflow_pb.v1 import common_pb2, keyframes_pb2, keyframes_pb2_grpc

KIND = "keyframes"
SERVICE_NAME = keyframes_pb2.DESCRIPTOR.services_by_name["Keyframes"].full_name
INDEX_FILE = "keyframes.json"


def image_name(frame_index: int) -> str:
    return f"keyframe_{frame_index:04d}.png"


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 RGB [H,W,3] -> PNG bytes (OpenCV writes BGR)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ModelError("could not encode a keyframe as PNG")
    return buf.tobytes()


class KeyframesServicer(StageServicer, keyframes_pb2_grpc.KeyframesServicer):
    """tokenflow.v1.Keyframes: EditKeyframes (streamed job) and Cancel."""

    stage = "keyframes"
    kind = KIND
    service_name = SERVICE_NAME
    response_type = keyframes_pb2.EditKeyframesResponse
    cancel_response_type = keyframes_pb2.KeyframesCancelResponse

    def EditKeyframes(  # noqa: N802 - gRPC method name
        self, request: keyframes_pb2.EditKeyframesRequest, context: grpc.ServicerContext
    ) -> Iterator[keyframes_pb2.EditKeyframesResponse]:
        return self.stream("EditKeyframes", context, lambda: self._plan(request))

    def Cancel(  # noqa: N802 - gRPC method name
        self, request: keyframes_pb2.KeyframesCancelRequest, context: grpc.ServicerContext
    ) -> keyframes_pb2.KeyframesCancelResponse:
        return self.cancel(request, context)

    def _plan(self, request: keyframes_pb2.EditKeyframesRequest) -> Plan:
        return plan_edit(self, request.inversion_digest, request.edit, self._run, preview=True)

    def _run(self, ctx: JobContext, source: InversionInput, spec: EditSpec, key: str) -> JobOutput:
        stored = already_stored(self.store, key, KIND)
        if stored is not None:
            return stored
        progress = JobProgress(ctx, self.stage, self.metrics, {"keyframes": 0.95})
        with self.store.pin(source.digest):
            inversion = source.load(self.store, self.model_host, self.metrics, progress)
            with self.model_host.use(progress.check_cancelled, progress.waiting) as model:
                progress.start()
                indices, frames = edit_keyframes(model, inversion, spec, progress.hooks())
        names = [image_name(i) for i in indices]
        files: dict[str, bytes] = {name: encode_png(f) for name, f in zip(names, frames, strict=True)}
        height, width = int(frames.shape[1]), int(frames.shape[2])
        index = {"keyframe_indices": indices, "image_files": names, "width": width, "height": height}
        files[INDEX_FILE] = json.dumps(index, indent=1).encode()
        meta = {
            **model_meta(self.model_host),
            **index,
            "inversion": source.digest,
            "inversion_psnr": (source.meta or {}).get("reconstruction_psnr"),
            "edit": spec.to_dict(),
        }
        manifest = self.store.put(KIND, key, files, meta=meta)
        progress.frames_processed(len(indices))
        return JobOutput(manifest, computed=True)

    def result(self, manifest: Manifest, cache_hit: bool) -> common_pb2.Result:
        meta = manifest.meta
        result = self.base_result(manifest, cache_hit, common_warnings(meta, "inversion_psnr"))
        result.keyframes.CopyFrom(
            common_pb2.KeyframesInfo(
                keyframe_indices=[int(i) for i in meta["keyframe_indices"]],
                image_files=[str(n) for n in meta["image_files"]],
                width=int(meta["width"]),
                height=int(meta["height"]),
            )
        )
        return result


def add_to_server(server: grpc.Server, servicer: KeyframesServicer) -> None:
    keyframes_pb2_grpc.add_KeyframesServicer_to_server(servicer, server)
