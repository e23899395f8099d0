"""The Propagation stage: the full TokenFlow edit of every frame, encoded as an mp4 with the source's audio.

The artifact's primary file is ``edited.mp4`` (a plain Artifacts.Download returns it) next to
``result.json`` (frames, rate, size, the keyframes drawn at each step). The video is rendered into a
private directory under the store's scratch space and only then published, so a failed or cancelled
job leaves nothing behind.

Source features (tokenflow.features): the first TokenFlow edit of an (inversion, keyframe schedule)
records them while its source branch runs anyway, and publishes them as a ``features`` artifact (key:
tokenflow.keys.features_key) if they fit the server's budget; every later edit with the same key, any
prompt, replays them, so its propagation pass runs only the unconditional and conditional branches.
The request's ``features`` field and ``--features-budget 0`` turn this off. The path taken and the
features' size are in the progress stream, the result, the artifact's metadata and the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.features import DEFAULT_FEATURES_BUDGET, publish_features
from services.inversion import video_path
from services.jobs import JobContext
from services.plan import InversionInput, plan_edit
from services.progress import JobProgress
from services.results import common_warnings, finite_or_none, model_meta
from services.servicer import JobOutput, Plan, StageServicer, already_stored
from services.store import ArtifactNotFound, ArtifactStore, Manifest
from tokenflow import keys
from tokenflow.branches import SourceHook
from tokenflow.editing import PATH_FEATURES, PATH_SOURCE_BRANCH
from tokenflow.errors import SpecError
from tokenflow.features import Features, FeaturesRecorder, replayer_for
from tokenflow.inversion import Inversion
from tokenflow.methods import method
from tokenflow.pipeline import render_edit
from tokenflow.specs import EditSpec
from tokenflow_pb.v1 import common_pb2, propagation_pb2, propagation_pb2_grpc

KIND = "propagation"
SERVICE_NAME = propagation_pb2.DESCRIPTOR.services_by_name["Propagation"].full_name
VIDEO_FILE = "edited.mp4"
RESULT_FILE = "result.json"
FEATURES_KIND = keys.FEATURES_KIND

log = logging.getLogger(__name__)


@dataclass
class FeaturesUse:
    """What one edit does with source features: replay, record, or neither (and why)."""

    hook: SourceHook | None = None
    key: str | None = None
    outcome: str = "off"  # services.metrics.FEATURE_OUTCOMES
    nbytes: int = 0
    note: str = ""

    @property
    def path(self) -> str:
        return PATH_FEATURES if self.outcome == "replayed" else PATH_SOURCE_BRANCH


def plan_features(
    store: ArtifactStore,
    stack: contextlib.ExitStack,
    scratch: Path,
    inversion_digest: str,
    inversion: Inversion,
    spec: EditSpec,
    budget: int,
) -> FeaturesUse | None:
    """Replay stored features, or record them, for this edit; None for methods without propagation."""
    if not method(spec.method).keyframes:
        return None
    if not spec.features or budget <= 0:
        why = "this request (features=false)" if not spec.features else "this server (--features-budget 0)"
        return FeaturesUse(
            note=f"source features are off for {why}: the propagation pass runs the source branch"
        )
    n, steps = inversion.n_frames, len(inversion.edit_timesteps)
    key = keys.features_key(inversion_digest, spec, n, steps)
    stack.enter_context(store.pin(key))
    stored = store.get(key, kind=FEATURES_KIND)
    if stored is not None:
        try:
            features = Features.from_paths({name: stored.path(name) for name in stored.names()})
            hook = replayer_for(features, n, steps, spec)
        except (SpecError, ArtifactNotFound) as e:  # corrupt or unfit: recorded again below
            log.warning("features %s unusable (%s): recording them again", key[:12], e)
        else:
            return FeaturesUse(
                hook,
                key,
                "replayed",
                features.nbytes,
                f"propagation from stored source features ({features.nbytes:,} bytes): no source branch",
            )
    recorder = FeaturesRecorder(
        scratch / "features", n, *keys.features_steps(spec, steps), budget=budget, meta={"key": key}
    )
    return FeaturesUse(
        recorder, key, "recorded", 0, "propagation runs the source branch and records its features"
    )


class PropagationServicer(StageServicer, propagation_pb2_grpc.PropagationServicer):
    """tokenflow.v1.Propagation: Propagate (streamed job) and Cancel."""

    stage = "propagation"
    kind = KIND
    service_name = SERVICE_NAME
    response_type = propagation_pb2.PropagateResponse
    cancel_response_type = propagation_pb2.PropagationCancelResponse
    features_budget: int = DEFAULT_FEATURES_BUDGET
    """Set by the server from --features-budget (0 = off)."""

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
            use = plan_features(
                self.store, stack, scratch, source.digest, inversion, spec, self.features_budget
            )
            if use is not None:
                self._report_features(ctx, use)
            with self.model_host.use(progress.check_cancelled, progress.waiting) as model:
                progress.start()
                out = render_edit(
                    model,
                    inversion,
                    spec,
                    output,
                    audio_source=audio,
                    hooks=progress.hooks(),
                    source_hook=use.hook if use is not None else None,
                )
            warnings: list[str] = []
            if use is not None:
                self._finish_features(use, source.digest, warnings)
                self._report_features(ctx, use)
            for path, count in out.result.propagation_batches.items():
                self.metrics.propagation_batches_total.labels(path=path).inc(count)
            progress.note("publish", "storing the edited video")
            info = {
                "frames": out.frames,
                "fps": [out.fps.numerator, out.fps.denominator],
                "width": inversion.width,
                "height": inversion.height,
            }
            features_meta = (
                {"path": use.path, "outcome": use.outcome, "bytes": use.nbytes, "key": use.key}
                if use is not None
                else None
            )
            summary = {
                **info,
                "method": spec.method,
                "keyframes": out.result.keyframes,
                "features": features_meta,
            }
            meta = {
                **model_meta(self.model_host),
                **info,
                "inversion": source.digest,
                "inversion_psnr": finite_or_none(inversion.reconstruction_psnr),
                "edit": spec.to_dict(),
                # The schedule actually used: with the inversion and the spec, the edit is reproducible.
                "keyframe_schedule": out.result.keyframes,
                "features": features_meta,
                **({"warnings": warnings} if warnings else {}),
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

    def _report_features(self, ctx: JobContext, use: FeaturesUse) -> None:
        ctx.report(
            {
                "stage": self.stage,
                "phase": "running",
                "message": use.note,
                "propagation_path": use.path,
                "features_bytes": use.nbytes,
            }
        )

    def _finish_features(self, use: FeaturesUse, inversion_digest: str, warnings: list[str]) -> None:
        """Publish what a recorder recorded (or say why not); count the outcome."""
        recorder = use.hook
        if isinstance(recorder, FeaturesRecorder) and use.key is not None:
            features = recorder.finish()
            if features is None:
                use.outcome, use.note = "over_budget", str(recorder.refused)
                warnings.append(use.note)
            else:
                try:
                    publish_features(self.store, self.model_host, use.key, inversion_digest, features)
                except Exception as e:  # noqa: BLE001 - the edit stands without its features
                    log.warning("could not store the source features %s: %s", use.key[:12], e)
                    use.outcome, use.note = "off", f"the source features could not be stored: {e}"
                else:
                    use.nbytes = features.nbytes
                    use.note = f"recorded the source features ({features.nbytes:,} bytes) for later prompts"
                    self.metrics.features_bytes_total.labels(action="recorded").inc(features.nbytes)
        elif use.outcome == "replayed":
            self.metrics.features_bytes_total.labels(action="replayed").inc(use.nbytes)
        self.metrics.features_total.labels(outcome=use.outcome).inc()

    def result(self, manifest: Manifest, cache_hit: bool) -> common_pb2.Result:
        meta = manifest.meta
        fps = meta["fps"]
        warnings = common_warnings(meta, "inversion_psnr") + [str(w) for w in meta.get("warnings") or []]
        result = self.base_result(manifest, cache_hit, warnings)
        result.propagation.CopyFrom(
            common_pb2.PropagationInfo(
                video_file=VIDEO_FILE,
                video_sha256=manifest.files[VIDEO_FILE].sha256,
                frames=int(meta["frames"]),
                fps=fps[0] / fps[1],
                width=int(meta["width"]),
                height=int(meta["height"]),
                propagation_path=str((meta.get("features") or {}).get("path", PATH_SOURCE_BRANCH)),
                features_bytes=int((meta.get("features") or {}).get("bytes", 0)),
            )
        )
        return result


def add_to_server(server: grpc.Server, servicer: PropagationServicer) -> None:
    propagation_pb2_grpc.add_PropagationServicer_to_server(servicer, server)
