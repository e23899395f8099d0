"""The Propagation stage: the full TokenFlow edit of every frame, encoded as an mp4 with the source's audio.

The artifact's primary file is ``edited.mp4`` (a plain Artifacts.Download returns it) next to
``result.json`` (frames, rate, size, the keyframes drawn at each step). The video is rendered into a
private directory under the store's scratch space and only then published, so a failed or cancelled
job leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from services.inversion import video_path
from services.jobs import JobContext
from services.plan import InversionInput, plan_edit
from services.progress import JobProgress
from services.results import common_warnings, finite_or_none, model_meta
from services.servicer import JobOutput, Plan, StageServicer, already_stored
from services.store import ArtifactNotFound, Manifest
from tokenflow.pipeline import render_edit
from tokenflow.specs import EditSpec
from tokenflow_pb.v1 import common_pb2, propagation_pb2, propagation_pb2_grpc

KIND = "propagation"
SERVICE_NAME = propagation_pb2.DESCRIPTOR.services_by_name["Propagation"].full_name
VIDEO_FILE = "edited.mp4"
RESULT_FILE = "result.json"


class PropagationServicer(StageServicer, propagation_pb2_grpc.PropagationServicer):
    """tokenflow.v1.Propagation: Propagate (streamed job) and Cancel."""

    stage = "propagation"
    kind = KIND
    service_name = SERVICE_NAME
    response_type = propagation_pb2.PropagateResponse
    cancel_response_type = propagation_pb2.PropagationCancelResponse

    def Propagate(  # noqa: N802 - gRPC method name
        self, request: propagation_pb2.PropagateRequest, context: grpc.ServicerContext
    ) -> Iterator[propagation_pb2.PropagateResponse]:
        return self.stream("Propagate", context, lambda: self._plan(request))

    def Cancel(  # noqa: N802 - gRPC method name
        self, request: propagation_pb2.PropagationCancelRequest, context: grpc.ServicerContext
    ) -> propagation_pb2.PropagationCancelResponse:
        return self.cancel(request, context)

    def _plan(self, request: propagation_pb2.PropagateRequest) -> Plan:
        return plan_edit(self, request.inversion_digest, request.edit, self._run, preview=False)

    def _run(self, ctx: JobContext, source: InversionInput, spec: EditSpec, key: str) -> JobOutput:
        stored = already_stored(self.store, key, KIND)
        if stored is not None:
            return stored
        progress = JobProgress(ctx, self.stage, self.metrics, {"edit": 0.9})
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.store.pin(source.digest))
            inversion = source.load(self.store, self.model_host, self.metrics, progress)
            audio = None
            if inversion.extra.get("source_has_audio"):
                # The audio is part of the result, so its source must be there: never publish a silent
                # video under a key that promises the source's sound.
                video_digest = str((source.meta or {})["video_digest"])  # set by source.load
                stack.enter_context(self.store.pin(video_digest))
                video = self.store.get(video_digest, kind="video")
                if video is None:
                    raise ArtifactNotFound(
                        f"the source video {video_digest} of this inversion is no longer stored and its "
                        "audio goes into the edit: upload it again with Artifacts.Upload (same bytes, same "
                        "digest)"
                    )
                audio = video_path(video)
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.store.tmp_dir)))
            output = scratch / VIDEO_FILE
            with self.model_host.use(progress.check_cancelled, progress.waiting) as model:
                progress.start()
                out = render_edit(model, inversion, spec, output, audio_source=audio, hooks=progress.hooks())
            progress.note("publish", "storing the edited video")
            info = {
                "frames": out.frames,
                "fps": [out.fps.numerator, out.fps.denominator],
                "width": inversion.width,
                "height": inversion.height,
            }
            summary = {**info, "method": spec.method, "keyframes": out.result.keyframes}
            meta = {
                **model_meta(self.model_host),
                **info,
                "inversion": source.digest,
                "inversion_psnr": finite_or_none(inversion.reconstruction_psnr),
                "edit": spec.to_dict(),
            }
            manifest = self.store.put(
                KIND,
                key,
                {VIDEO_FILE: output, RESULT_FILE: json.dumps(summary).encode()},
                meta=meta,
                primary=VIDEO_FILE,
            )
        progress.frames_processed(out.frames)
        return JobOutput(manifest, computed=True)

    def result(self, manifest: Manifest, cache_hit: bool) -> common_pb2.Result:
        meta = manifest.meta
        fps = meta["fps"]
        result = self.base_result(manifest, cache_hit, common_warnings(meta, "inversion_psnr"))
        result.propagation.CopyFrom(
            common_pb2.PropagationInfo(
                video_file=VIDEO_FILE,
                video_sha256=manifest.files[VIDEO_FILE].sha256,
                frames=int(meta["frames"]),
                fps=fps[0] / fps[1],
                width=int(meta["width"]),
                height=int(meta["height"]),
            )
        )
        return result


def add_to_server(server: grpc.Server, servicer: PropagationServicer) -> None:
    propagation_pb2_grpc.add_PropagationServicer_to_server(servicer, server)
